"""Data sources (classification tables, chats, plain text), train/test splits, the
partition over peers and each peer's data order."""
