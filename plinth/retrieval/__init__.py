"""Retrieval: documents chunked, embedded and searched (dense, lexical, hybrid), and answers grounded in them."""
