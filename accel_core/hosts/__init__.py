"""Host adapters. Each imports its host lazily, inside functions, so importing the core never needs a host."""
