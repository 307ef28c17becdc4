//! Group-wise asymmetric quantization (KIVI) and the MiKV mixed-precision KV cache (SPEC §1).
