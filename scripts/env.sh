# Environment shared by the demo and the tests (sourced).
export VLLM_CACHE_ROOT=${VLLM_CACHE_ROOT:-$PWD/.cache/vllm}
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1
export RAY_DEDUP_LOGS=1
