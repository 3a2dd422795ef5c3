"""Pretrained encoders that several packages build on: the CLIP model behind the similarity filter
op, DualViTok's semantic teacher and the CLIP trainer. They sit below ``data`` in the package chain
so that each of those may use them."""
