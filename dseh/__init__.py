"""dseh: Deep Joint Semantic-Embedding Hashing (IJCAI 2018) for large-scale image retrieval."""

__version__ = "0.1.0"
