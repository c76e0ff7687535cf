"""TorchX components of sidvid_rec (``torchx run torchx_components/sidvid.py:<job>``)."""
