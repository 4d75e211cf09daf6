"""Leak attribution: every recipient's copy of a fingerprinted release names its recipient.

- ``keys``: the release key, recipient codes, and which positions move which way;
- ``layout``: where each tensor's bytes lie in a ``consolidated.NN.pth`` or safetensors
  file, and where its elements lie in merged, unpermuted (Meta) coordinates;
- ``embed``: a recipient's bytes of any byte range of a weight file;
- ``throughput_bench``: the embedder's MB/s next to plain reads.

Submodules are imported where used: ``keys`` is pure numpy, ``layout`` needs torch.
"""
