"""Batch integration (batch correction) of cell embeddings: training objectives and scib's metrics."""
