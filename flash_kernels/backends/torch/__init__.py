"""The PyTorch backends: `reference.py` (dense O(T^2), the ground truth), `chunked.py` (O(T)
memory, differentiated by autograd) and `decode.py` (one decoding step in tensor code)."""
