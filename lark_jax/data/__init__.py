"""Pool schema and validation, chat tokenization, packing."""
