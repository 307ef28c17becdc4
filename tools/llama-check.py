"""Checks ntkv-eval's forward and tokenizer against llama.cpp (llama-cpp-python).

(a) exact: llama.cpp on an f32 copy of the weights (dequantized with the `gguf` package),
    f32 KV cache, the same tokens: top-1 equal at >= 99.9% of positions, max |logit diff|
    <= 1e-2, perplexity within 0.1%;
(b) as shipped: llama.cpp on the Q4_1 file (its CPU path quantizes activations to 8 bits):
    perplexity within 1%;
(c) the tokenizer: llama.cpp's tokens of the evaluation text equal ntkv-eval's.

Usage: llama-check.py MODEL.gguf LOGITS_DIR TOKENS_DIR WORK_DIR [Q8_LOGITS_DIR]
  LOGITS_DIR from `ntkv-eval logits`, TOKENS_DIR from `ntkv-eval tokenize`; Q8_LOGITS_DIR
  from `ntkv-eval logits --act-q8` (activations rounded as llama.cpp's CPU path rounds them),
  printed beside (b) for diagnosis.
Exits non-zero when a bar is missed.
"""
import json
import os
import sys

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize
from llama_cpp import Llama

GGML_TYPE_F32 = 0  # ggml_type for the KV cache


def f32_copy(src, dst):
    """Writes `src` with every tensor dequantized to f32 and the same metadata."""
    if os.path.exists(dst):
        return
    r = GGUFReader(src)
    w = GGUFWriter(dst + ".part", arch="llama")
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = field.types[0]
        value = field.contents()
        if name == "general.file_type":
            value = 0  # all f32
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        w.add_key_value(name, value, vtype, sub_type=sub)
    for t in r.tensors:
        data = dequantize(t.data, t.tensor_type).astype(np.float32)
        w.add_tensor(t.name, data, raw_dtype=GGMLQuantizationType.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(dst + ".part", dst)


def llama_logits(path, tokens, f32_kv):
    kw = dict(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32) if f32_kv else {}
    llm = Llama(model_path=path, n_ctx=len(tokens), n_batch=len(tokens), n_ubatch=len(tokens),
                logits_all=True, n_threads=2, verbose=False, flash_attn=False, **kw)
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float64), llm


def ppl(logits, tokens):
    x = logits[:-1]
    m = x.max(axis=1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(axis=1)) + m[:, 0]
    nll = lse - x[np.arange(len(x)), tokens[1:]]
    return float(np.exp(nll.mean()))


def main():
    model, logits_dir, tokens_dir, work = sys.argv[1:5]
    q8_dir = sys.argv[5] if len(sys.argv) > 5 else None
    os.makedirs(work, exist_ok=True)
    tokens = json.load(open(os.path.join(logits_dir, "tokens.json")))
    ours = np.fromfile(os.path.join(logits_dir, "logits.f32"), dtype=np.float32).astype(np.float64)
    ours = ours.reshape(len(tokens), -1)
    ok = True

    f32 = os.path.join(work, "SmolLM2-135M-Instruct.f32.gguf")
    f32_copy(model, f32)
    ref, _ = llama_logits(f32, tokens, f32_kv=True)
    top1 = float((ref.argmax(1) == ours.argmax(1)).mean())
    maxdiff = float(np.abs(ref - ours).max())
    p_ref, p_ours = ppl(ref, tokens), ppl(ours, tokens)
    rel = abs(p_ours / p_ref - 1)
    a = top1 >= 0.999 and maxdiff <= 1e-2 and rel <= 1e-3
    ok &= a
    print(f"(a) exact, f32 weights + f32 KV, {len(tokens)} tokens: top-1 equal {top1 * 100:.2f}%, "
          f"max |logit diff| {maxdiff:.2e}, ppl llama.cpp {p_ref:.4f} ours {p_ours:.4f} "
          f"({rel * 100:.4f}%): {'PASS' if a else 'FAIL'}")

    q, llm = llama_logits(model, tokens, f32_kv=False)
    p_q = ppl(q, tokens)
    rel_q = abs(p_ours / p_q - 1)
    b = rel_q <= 1e-2
    ok &= b
    print(f"(b) as shipped Q4_1 (llama.cpp's 8-bit activations, f16 KV): ppl llama.cpp {p_q:.4f} ours "
          f"{p_ours:.4f} ({rel_q * 100:.3f}%), top-1 equal {float((q.argmax(1) == ours.argmax(1)).mean()) * 100:.2f}%: "
          f"{'PASS' if b else 'FAIL'}")
    if q8_dir:
        q8 = np.fromfile(os.path.join(q8_dir, "logits.f32"), dtype=np.float32).astype(np.float64)
        print(f"    ours with q8-rounded activations: ppl {ppl(q8.reshape(len(tokens), -1), tokens):.4f}")

    text = open(os.path.join(tokens_dir, "text.txt"), encoding="utf-8").read()
    ids = json.load(open(os.path.join(tokens_dir, "ids.json")))
    theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    first = next((i for i, (x, y) in enumerate(zip(ids, theirs)) if x != y), None)
    c = ids == theirs
    ok &= c
    where = "" if c else f", first difference at token {first if first is not None else min(len(ids), len(theirs))}"
    print(f"(c) tokenizer on {len(text)} characters: ours {len(ids)} tokens, llama.cpp {len(theirs)}{where}: "
          f"{'PASS' if c else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
