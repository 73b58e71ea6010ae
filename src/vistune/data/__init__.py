"""Training data: LLaVA-format records, the dataset, collation and batch sampling."""
