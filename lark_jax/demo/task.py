"""The embedded multi-teacher reasoning task: arithmetic word problems and six teachers.

Problems. A person starts with some items and 2-4 things happen to them, each one sentence:
finds ``n`` more (+n), gives ``n`` away (-n), buys ``k`` boxes of ``m`` (+k*m, two
operations), the number doubles (*2), splits them into ``d`` equal piles and keeps one (/d,
only when ``d`` divides). The question asks how many are left; the answer is an integer, so
it is verifiable exactly. Every count stays within 1..``MAX_VALUE`` (20) so that the table of
single operations the task needs is a few hundred facts, which a tiny student can learn. The
number of steps is the benchmark's level.

Pre-training corpus (``pretrain_corpus``): retellings of problems in short words (no
computation), lists of isolated arithmetic facts ``a op b = r.``, and short snippets of every
teacher's writing (a few words each, shuffled across problems); never a worked solution, so
solving must be learnt in fine-tuning. Like a pre-trained language model, the student has
read every teacher's words, so what sets teachers apart is how their reasoning fits what it
knows, not unseen tokens: without the snippets 96-100 % of every teacher's loss came from
tokens it had never seen (cross-entropy above 5 nats), each with Brier ~1-2, so ρ = Brier / L
was ~0.15 for every trajectory and LARK's ĝ ranked them by loss alone (Spearman(ĝ, L) +0.74
over the quick pool).

Teachers (what differs between them is the point of the demo; none of them is "the" style):

    stepwise      the retelling the student knows, then one line per operation, "Step i,
                  <event words>: a op b = r." (the facts' form), then the answer. Always
                  correct. Reuses the most of what the student knows.
    terse         the whole computation as one expression with its value, no intermediate
                  results: needs multi-step mental arithmetic. Always correct.
    stack         an unusual notation: a stack machine trace with symbols (``⊕ ⊖ ⊗ ⊘``),
                  intermediate results but not in the facts' form. Always correct.
    careless      step-by-step in other words ("First, ... Next, ...") with an arithmetic
                  slip in a share ``wrong_rate`` of its samples; the slip propagates, so the
                  final answer of those samples is wrong (exactly by a non-zero amount).
    rambler       long, chatty, restates the problem and sometimes writes a wrong
                  intermediate result, notices it and corrects it. Final answer correct.
    answer_only   just ``\\boxed{answer}``. Always correct.

Every trajectory ends with the answer in ``\\boxed{}``. ``careless`` and ``rambler`` give two
samples per problem (their randomness differs), the others one, so K = 8 candidates.

Outputs: a pool in the reference JSONL format, a held-out benchmark (``{"problem",
"answer", "level"}``), reference solutions for the benchmark (used only for the held-out
loss diagnostics), and a pre-training corpus on disjoint problems. Everything is a pure
function of (config, seed): the same seed gives byte-identical files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
from collections.abc import Iterable
from pathlib import Path

from lark_jax import fsio
from lark_jax.errors import LarkError

TASK_VERSION = "arith-v3"
TEACHERS = ("stepwise", "terse", "stack", "careless", "rambler", "answer_only")
# samples per problem from each teacher
SAMPLES = {"stepwise": 1, "terse": 1, "stack": 1, "careless": 2, "rambler": 2, "answer_only": 1}

NAMES = ("Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kim", "Leo",
         "Mia", "Noa", "Omar", "Pia", "Ravi", "Sara", "Tom", "Uma")
ITEMS = ("apples", "marbles", "stickers", "coins", "shells", "cards", "pens", "stamps", "beads",
         "books")
RAMBLER_MAX_CHARS = 540  # problem + solution, in characters
SYMBOL = {"+": "⊕", "-": "⊖", "*": "⊗", "/": "⊘"}


@dataclasses.dataclass(frozen=True)
class Step:
    """One event of a problem: ``kind`` in add/sub/group/double/share, its numbers, its text."""

    kind: str
    args: tuple[int, ...]
    text: str


@dataclasses.dataclass(frozen=True)
class Equation:
    a: int
    op: str
    b: int
    result: int
    step: int  # index of the Step it belongs to

    def show(self, result: int | None = None) -> str:
        return f"{self.a} {self.op} {self.b} = {self.result if result is None else result}"


@dataclasses.dataclass(frozen=True)
class Problem:
    pid: int
    name: str
    item: str
    start: int
    steps: tuple[Step, ...]

    @property
    def statement(self) -> str:
        events = " ".join(s.text for s in self.steps)
        return (f"{self.name} has {self.start} {self.item}. {events} "
                f"How many {self.item} does {self.name} have now?")

    def solve(self, slip: tuple[int, int] | None = None) -> list[Equation]:
        """The operations in order; ``slip=(i, delta)`` adds ``delta`` to equation i's result
        (and carries the wrong value on, as a careless solver would)."""
        v = self.start
        eqs: list[Equation] = []

        def emit(a, op, b, r, i):
            if slip is not None and slip[0] == len(eqs):
                r += slip[1]
            eqs.append(Equation(a, op, b, r, i))
            return r

        for i, s in enumerate(self.steps):
            if s.kind == "add":
                v = emit(v, "+", s.args[0], v + s.args[0], i)
            elif s.kind == "sub":
                v = emit(v, "-", s.args[0], v - s.args[0], i)
            elif s.kind == "group":
                k, m = s.args
                km = emit(k, "*", m, k * m, i)
                v = emit(v, "+", km, v + km, i)
            elif s.kind == "double":
                v = emit(v, "*", 2, v * 2, i)
            elif s.kind == "share":
                v = emit(v, "/", s.args[0], v // s.args[0], i)
        return eqs

    @property
    def answer(self) -> int:
        return self.solve()[-1].result


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Sizes and knobs of the task; every output is a pure function of these."""

    n_pool: int = 160  # problems in the training pool
    n_bench: int = 64  # held-out benchmark problems
    n_pretrain: int = 600  # problems of the pre-training corpus (disjoint from both)
    wrong_rate: float = 0.3  # share of the careless teacher's samples with a wrong answer
    min_steps: int = 2
    max_steps: int = 4
    seed: int = 0

    def validate(self) -> None:
        if min(self.n_pool, self.n_bench) < 1 or self.n_pretrain < 0:
            raise LarkError("the task needs n_pool >= 1, n_bench >= 1, n_pretrain >= 0")
        if not 0.0 <= self.wrong_rate <= 1.0:
            raise LarkError(f"wrong_rate must lie in [0, 1], got {self.wrong_rate}")
        if not 1 <= self.min_steps <= self.max_steps <= 6:
            raise LarkError("need 1 <= min_steps <= max_steps <= 6")

    def recipe(self) -> dict:
        return {"version": TASK_VERSION, **dataclasses.asdict(self)}

    def corpus_recipe(self) -> dict:
        """What the pre-training corpus depends on (part of the student's cache key)."""
        return {"version": TASK_VERSION, "seed": self.seed, "n_pretrain": self.n_pretrain,
                "min_steps": self.min_steps, "max_steps": self.max_steps}


# -- problems ----------------------------------------------------------------------------


MAX_VALUE = 20  # every count a problem reaches stays within 1..MAX_VALUE


def _make_step(rng: random.Random, v: int, name: str, item: str) -> tuple[Step, int]:
    # Small numbers keep the table of arithmetic facts the task needs small (a few hundred
    # equations), so that a tiny student can know all of them from pre-training.
    room = MAX_VALUE - v
    kinds = []
    if room >= 1:
        kinds.append("add")
    if v >= 3:
        kinds.append("sub")
    if room >= 4:
        kinds.append("group")
    if 2 * v <= MAX_VALUE:
        kinds.append("double")
    divisors = [d for d in (2, 3) if v % d == 0 and v // d >= 2]
    if divisors:
        kinds.append("share")
    kind = rng.choice(kinds)
    if kind == "add":
        n = rng.randint(1, min(9, room))
        verb = rng.choice(("finds", "gets", "wins", "is given"))
        return Step(kind, (n,), f"{name} {verb} {n} more {item}."), v + n
    if kind == "sub":
        n = rng.randint(1, min(9, v - 1))
        verb = rng.choice(("gives away", "loses", "sells", "uses up"))
        return Step(kind, (n,), f"Then {name} {verb} {n} {item}."), v - n
    if kind == "group":
        k = rng.randint(2, min(3, room // 2))
        m = rng.randint(2, min(4, room // k))
        box = rng.choice(("boxes", "bags", "packs"))
        return Step(kind, (k, m), f"{name} buys {k} {box} with {m} {item} in each."), v + k * m
    if kind == "double":
        return Step(kind, (2,), f"Then the number of {item} doubles."), v * 2
    d = rng.choice(divisors)
    return (Step(kind, (d,), f"{name} splits the {item} into {d} equal piles and keeps one."),
            v // d)


def make_problem(rng: random.Random, pid: int, min_steps: int = 2, max_steps: int = 4) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start = rng.randint(2, 12)
    v, steps = start, []
    for _ in range(rng.randint(min_steps, max_steps)):
        s, v = _make_step(rng, v, name, item)
        steps.append(s)
    return Problem(pid, name, item, start, tuple(steps))


def make_problems(n: int, rng: random.Random, cfg: TaskConfig, avoid: set[str],
                  first_pid: int = 0) -> list[Problem]:
    """``n`` problems whose statements are new (not in ``avoid``, which is updated)."""
    out: list[Problem] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise LarkError(f"could not draw {n} distinct problems; lower the task size")
        p = make_problem(rng, first_pid + len(out), cfg.min_steps, cfg.max_steps)
        if p.statement in avoid:
            continue
        avoid.add(p.statement)
        out.append(p)
    return out


# -- teachers ----------------------------------------------------------------------------


def _describe(p: Problem, e: Equation) -> str:
    """The words naming the event an equation computes (those of ``retelling``)."""
    s = p.steps[e.step]
    if s.kind == "group" and e.op == "+":
        return "add them"
    return event_words(s)


def boxed(x: int) -> str:
    return f"\\boxed{{{x}}}"


def teach_stepwise(p: Problem, rng: random.Random) -> str:
    # Opens with the retelling the student knows from pre-training, then one fact per line.
    lines = [retelling(p)] + [f"Step {i + 1}, {_describe(p, e)}: {e.show()}."
                              for i, e in enumerate(p.solve())]
    return "\n".join(lines) + f"\nThe answer is {boxed(p.answer)}."


def expression(p: Problem) -> str:
    """The computation as one expression, with the parentheses it needs."""
    expr, low = str(p.start), False  # low: top-level operator is + or -
    for s in p.steps:
        if s.kind == "add":
            expr, low = f"{expr} + {s.args[0]}", True
        elif s.kind == "sub":
            expr, low = f"{expr} - {s.args[0]}", True
        elif s.kind == "group":
            expr, low = f"{expr} + {s.args[0]} * {s.args[1]}", True
        else:
            op = "*" if s.kind == "double" else "/"
            expr, low = (f"({expr}) {op} {s.args[0]}" if low else f"{expr} {op} {s.args[0]}"), False
    return expr


def teach_terse(p: Problem, rng: random.Random) -> str:
    return f"{expression(p)} = {p.answer}. {boxed(p.answer)}"


def teach_stack(p: Problem, rng: random.Random) -> str:
    parts = [f"⟦{p.start}⟧"]
    for e in p.solve():
        if e.op == "*" and p.steps[e.step].kind == "group":  # a side computation
            parts.append(f"⟪{e.a}{SYMBOL['*']}{e.b} ↦ {e.result}⟫")
        else:
            parts.append(f"{SYMBOL[e.op]}{e.b} ↦ ⟦{e.result}⟧")
    return " ".join(parts) + f" ∎ {boxed(p.answer)}"


def careless_slip(p: Problem, rng: random.Random) -> tuple[int, int]:
    """A wrong-answer slip (equation index, delta) that keeps every later division exact."""
    eqs = p.solve()
    i = rng.randrange(len(eqs))
    later = 1
    for e in eqs[i + 1:]:
        if e.op == "/":
            later *= e.b
    delta = later * rng.randint(1, 3)
    if eqs[i].result - delta >= 0 and rng.random() < 0.5:
        delta = -delta
    if eqs[i].op == "/":  # a slip in a division: off by whole units of the quotient
        delta = delta if delta > 0 else -min(-delta, eqs[i].result)
        if delta == 0:
            delta = later
    return i, delta


def teach_careless(p: Problem, rng: random.Random, wrong: bool) -> str:
    eqs = p.solve(careless_slip(p, rng) if wrong else None)
    words = ["First", "Next", "Then", "After that", "Then", "Next", "After that", "Then"]
    lines = [f"{words[min(i, len(words) - 1)]}, {e.show()}." for i, e in enumerate(eqs)]
    return " ".join(lines) + f" So {p.name} has {boxed(eqs[-1].result)} {p.item}."


def teach_rambler(p: Problem, rng: random.Random) -> str:
    out = [rng.choice(("Hmm, let me see.", "Okay, let me think.", "Let me read it again.")),
           f"{p.name} starts with {p.start} {p.item}."]
    for e in p.solve():
        s = p.steps[e.step]
        if not (e.op == "+" and s.kind == "group") and rng.random() < 0.3:
            out.append(f"It says: {s.text}")  # restates some of the events
        if rng.random() < 0.35:
            off = e.result + rng.choice((-2, -1, 1, 2))
            out.append(f"So {e.show(off)}... no wait, {e.show()}.")
        else:
            out.append(f"So {e.show()}. " + rng.choice(("Right.", "Okay.", "Good.")))
    out.append(f"So the answer is {boxed(p.answer)}.")
    text = " ".join(out)
    if len(text) + len(p.statement) > RAMBLER_MAX_CHARS:  # keep records within 256 tokens
        text = " ".join(x for x in out if not x.startswith("It says: "))
    return text


def teach_answer_only(p: Problem, rng: random.Random) -> str:
    return boxed(p.answer)


def reference_solution(p: Problem) -> str:
    """The benchmark's worked solution (held-out diagnostics only; no teacher writes exactly
    this): one short line per operation, the answer last."""
    return " ".join(f"{e.show()}." for e in p.solve()) + f" Answer: {boxed(p.answer)}"


def chat(p: Problem, assistant: str | None = None) -> list[dict]:
    """The chat record of a problem: the statement as the user turn (no system prompt: the
    demo evaluates with an empty one, keeping sequences short), the solution if given."""
    msgs = [{"role": "user", "content": p.statement}]
    if assistant is not None:
        msgs.append({"role": "assistant", "content": assistant})
    return msgs


def trajectories(p: Problem, rng: random.Random, wrong_rate: float
                 ) -> list[tuple[str, str, bool]]:
    """All candidates of one problem: (teacher, assistant text, answer is correct)."""
    out = []
    for t in TEACHERS:
        for _ in range(SAMPLES[t]):
            if t == "careless":
                wrong = rng.random() < wrong_rate
                out.append((t, teach_careless(p, rng, wrong), not wrong))
            else:
                fn = {"stepwise": teach_stepwise, "terse": teach_terse, "stack": teach_stack,
                      "rambler": teach_rambler, "answer_only": teach_answer_only}[t]
                out.append((t, fn(p, rng), True))
    return out


# -- the task ------------------------------------------------------------------------------


@dataclasses.dataclass
class Task:
    """The generated task in memory; ``write`` puts it on disk."""

    cfg: TaskConfig
    pool: list[dict]  # reference pool records (with an extra "correct" field in ``meta``)
    bench: list[dict]  # {"problem", "answer", "level"}
    reference: list[dict]  # {"messages": [...]} reference solutions of the benchmark
    pretrain: list[dict]  # {"messages": [...]} pre-training records (neutral teacher mix)
    bench_trajectories: list[dict]  # {"teacher", "messages"}: one sample per teacher and
    # benchmark problem (held-out diagnostics: how fast the student learns each teacher)
    problems: dict[str, list[Problem]]

    def pool_lines(self) -> Iterable[str]:
        for r in self.pool:
            yield json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n"

    def write(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """pool.jsonl, benchmark.json, reference.jsonl, pretrain.jsonl, task.json (atomic)."""
        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        files = {
            "pool": (d / "pool.jsonl", "".join(self.pool_lines())),
            "benchmark": (d / "benchmark.json",
                          json.dumps(self.bench, indent=1, ensure_ascii=False) + "\n"),
            "reference": (d / "reference.jsonl", _jsonl(self.reference)),
            "pretrain": (d / "pretrain.jsonl", _jsonl(self.pretrain)),
            "task": (d / "task.json", json.dumps(self.cfg.recipe(), indent=1) + "\n"),
        }
        for path, text in files.values():
            fsio.atomic_write(path, text)
        return {k: v[0] for k, v in files.items()}


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


FACTS_PROMPT = "Write some arithmetic facts."
FACTS_PER_RECORD = 8


def event_words(s: Step) -> str:
    """A few words naming an event (``stepwise`` labels its steps with the same words)."""
    if s.kind == "group":
        return f"{s.args[0]} boxes of {s.args[1]}"
    return {"add": f"get {s.args[0]}", "sub": f"lose {s.args[0]}", "double": "double",
            "share": f"keep 1 of {s.args[0]}"}[s.kind]


def retelling(p: Problem) -> str:
    """The events of a problem in short words, without computing anything."""
    return (f"{p.name} starts with {p.start} {p.item}. Then: "
            + ", ".join(event_words(s) for s in p.steps) + ".")


SNIPPETS_PROMPT = "Write some snippets."
SNIPPETS_PER_RECORD = 6
SNIPPET_WORDS = (2, 6)


def snippets(p: Problem, rng: random.Random) -> list[str]:
    """One short run of words (``SNIPPET_WORDS``) from each teacher's solution of ``p``.

    What a pre-trained language model has that a student trained only on retellings and
    facts lacks: it has read text in every teacher's words and notation, so no teacher's
    tokens are unseen. A snippet is a few words, never a whole solution, and the snippets
    of all corpus problems are shuffled together (as the facts are), so they teach the
    teachers' vocabulary and local phrasing but not how to go from a problem to its answer.
    No snippet states a wrong fact: the careless teacher's come from its correct samples,
    and no snippet overlaps one of the rambler's slips (``So 8 * 2 = 15... no wait``).
    """
    out = []
    for _, text, _ in trajectories(p, rng, wrong_rate=0.0):
        words = [m.span() for m in re.finditer(r"\S+", text)]
        bad = [m.span() for m in _EQUATION.finditer(text) if not _holds(*m.groups())]
        n = min(len(words), rng.randint(*SNIPPET_WORDS))
        starts = [i for i in range(len(words) - n + 1)
                  if not any(a < words[i + n - 1][1] and words[i][0] < b for a, b in bad)]
        if starts:
            i = rng.choice(starts)
            out.append(text[words[i][0]:words[i + n - 1][1]])
    return out


_EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def _holds(a: str, op: str, b: str, r: str) -> bool:
    """Whether the equation ``a op b = r`` is true (``/`` exact, as the task divides)."""
    a_, b_, r_ = int(a), int(b), int(r)
    if op == "/":
        return b_ != 0 and b_ * r_ == a_
    return {"+": a_ + b_, "-": a_ - b_, "*": a_ * b_}[op] == r_


def pretrain_corpus(problems: list[Problem], rng: random.Random) -> list[dict]:
    """The pre-training corpus: the task's language and its arithmetic, but no solutions.

    Three kinds of records. A *retelling* answers a problem statement with its events in
    short words (``retelling``: "Ada starts with 5 apples. Then: get 3, double."): the
    student learns to read problems and to copy their numbers, but computes nothing. A
    *facts* record (after ``FACTS_PROMPT``) lists ``FACTS_PER_RECORD`` isolated equations
    ``a op b = r.``, drawn from the solutions of all corpus problems and shuffled together,
    so that the student knows every single operation the task needs. A *snippets* record
    (after ``SNIPPETS_PROMPT``) holds ``SNIPPETS_PER_RECORD`` runs of a few words from the
    teachers' solutions of corpus problems (``snippets``), shuffled together: every
    teacher's vocabulary and notation, no chain of steps. It has never seen a problem
    solved: going from a statement to an answer, chaining results, must be learnt in
    fine-tuning.
    """
    # Facts: one random single event per corpus problem from every count 2..MAX_VALUE, so
    # the whole table is covered evenly (a problem's own equations favour small counts).
    facts = []
    for _ in range(len(problems) * FACTS_PER_RECORD):
        v = rng.randint(2, MAX_VALUE)
        step, _ = _make_step(rng, v, "x", "y")
        facts += [e.show() + "." for e in Problem(0, "x", "y", v, (step,)).solve()]
    stories = [{"messages": chat(p, retelling(p))} for p in problems]
    fact_recs = [{"messages": [{"role": "user", "content": FACTS_PROMPT},
                               {"role": "assistant",
                                "content": " ".join(facts[i:i + FACTS_PER_RECORD])}]}
                 for i in range(0, len(facts), FACTS_PER_RECORD)]
    snips = [s for p in problems for s in snippets(p, rng)]
    rng.shuffle(snips)
    snip_recs = [{"messages": [{"role": "user", "content": SNIPPETS_PROMPT},
                               {"role": "assistant",
                                "content": "\n".join(snips[i:i + SNIPPETS_PER_RECORD])}]}
                 for i in range(0, len(snips), SNIPPETS_PER_RECORD)]
    out = stories + fact_recs + snip_recs
    rng.shuffle(out)
    return out


def build_task(cfg: TaskConfig = TaskConfig()) -> Task:
    """Generate the whole task from ``cfg`` (deterministic; see the module docstring)."""
    cfg.validate()
    seen: set[str] = set()
    # The corpus first, from its own stream: it (and so the student) does not depend on the
    # pool and benchmark sizes; those avoid every statement drawn before them.
    pre_p = make_problems(cfg.n_pretrain, random.Random(f"{cfg.seed}/pretrain"), cfg, seen)
    bench_p = make_problems(cfg.n_bench, random.Random(f"{cfg.seed}/bench"), cfg, seen)
    pool_p = make_problems(cfg.n_pool, random.Random(f"{cfg.seed}/pool"), cfg, seen)
    rng = random.Random(f"{cfg.seed}/teachers")
    pool = []
    for p in pool_p:
        for cid, (teacher, text, correct) in enumerate(trajectories(p, rng, cfg.wrong_rate)):
            pool.append({"problem_id": p.pid, "candidate_id": cid, "teacher": teacher,
                         "messages": chat(p, text),
                         "meta": {"answer": str(p.answer), "correct": correct}})
    bench = [{"problem": p.statement, "answer": str(p.answer), "level": len(p.steps)}
             for p in bench_p]
    reference = [{"messages": chat(p, reference_solution(p))} for p in bench_p]
    pretrain = pretrain_corpus(pre_p, random.Random(f"{cfg.seed}/pretrain-text"))
    brng = random.Random(f"{cfg.seed}/bench-teachers")
    bench_traj = []
    for p in bench_p:
        seen_t: set[str] = set()
        for teacher, text, _ in trajectories(p, brng, cfg.wrong_rate):
            if teacher not in seen_t:
                seen_t.add(teacher)
                bench_traj.append({"teacher": teacher, "messages": chat(p, text)})
    return Task(cfg, pool, bench, reference, pretrain, bench_traj,
                {"pool": pool_p, "bench": bench_p, "pretrain": pre_p})
