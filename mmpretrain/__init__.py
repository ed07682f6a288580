"""mmpretrain: distributed pretraining of NVLM-style vision-language models on megatron-core."""
