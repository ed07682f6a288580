"""mmpretrain.data: shards, decoding, resize, patchify, tokens, packing, the synthetic dataset."""
