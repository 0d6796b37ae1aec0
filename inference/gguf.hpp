// GGUF export: a hybrit model as llama.cpp's `bitnet` architecture, so llama.cpp (and ollama, LM
// Studio) run it. The layout follows ggml's own files: gguf.h (the container), ggml-common.h (the
// TQ1_0 / TQ2_0 blocks) and llama.cpp's src/llama-model.cpp (the bitnet tensors: SubLN norms,
// SwiGLU, the token embedding reused as the head, optional per-tensor `.scale` tensors that
// multiply a matmul's output).
//
// BitLinear weights are written as their exact ternary codes with the absmean scale in the
// `.scale` tensor, so the file holds exactly the weights hybrit runs: TQ2_0 (2.06 bits a weight)
// or TQ1_0 (1.69) when a row's length is a multiple of 256, else F16 (which holds -1, 0, 1
// exactly). The embedding and the norms stay F32.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "dispatch/dispatcher.hpp"
#include "model/checkpoint.hpp"  // InferenceExport

namespace hybrit {

// GGUF's tensor types that hybrit writes (values are ggml's enum ggml_type).
enum class GgufTensorType : uint32_t { f32 = 0, f16 = 1, tq1_0 = 34, tq2_0 = 35 };
const char* to_string(GgufTensorType type);

struct GgufExportOptions {
  // The BitLinear weights' type: tq2_0, tq1_0 or f16. A row whose length is not a multiple of 256
  // (dim, ffn_hidden) cannot be a TQ block: that tensor is written as F16 and a note says so.
  std::string type = "tq2_0";
  std::string name;  // general.name; empty: the checkpoint's file name
};

struct GgufExportReport {
  std::string architecture;             // "bitnet"
  int64_t tensors = 0, file_bytes = 0;
  std::vector<std::string> notes;       // tensors that fell back to F16, and why
};

// `hybrit checkpoint export`'s --format (and Python's format=): "gguf", "hyb", or "auto", which is
// gguf when `out_path` ends in .gguf. Anything else is an Error naming the choices.
bool export_as_gguf(const std::string& format, const std::string& out_path);

// Writes `out_path` (atomically) from a training checkpoint or its export. Refuses, naming the
// options that export, a model llama.cpp has no graph for: the bitnet graph needs model.subln:
// true, model.ffn: swiglu and model.tied_embeddings: true. The tokenizer travels: the byte
// tokenizer as a GPT-2 byte-level vocabulary (256 byte tokens, then the end of a record as EOS),
// a BPE (sentencepiece) model as an SPM vocabulary with its scores and byte fallback.
GgufExportReport export_gguf(Dispatcher& dispatcher, const std::string& checkpoint, const std::string& out_path, const GgufExportOptions& options);

// The blocks of one row of ternary codes (-1, 0, 1; length a multiple of 256), as ggml's
// quantize_row_tq2_0_ref / quantize_row_tq1_0_ref write them for those values: block scale d is
// the block's largest |code| (1, or 0 for an all-zero block).
std::vector<uint8_t> tq2_0_row(const int8_t* codes, int64_t n);
std::vector<uint8_t> tq1_0_row(const int8_t* codes, int64_t n);
// IEEE half precision, rounded to nearest even (ggml_fp32_to_fp16).
uint16_t float_to_half(float value);

// GPT-2's byte-to-unicode map: the printable text llama.cpp's byte-level BPE vocabulary uses for
// byte b (tokens are looked up by this text).
std::string gpt2_byte_token(uint8_t b);

// The reverse, for `hybrit generate/serve -m MODEL.gguf`: whether a file starts with GGUF's
// magic, and a bitnet GGUF read back as the export it is equivalent to (config, tokenizer,
// f32 tensors, packed ternary codes). Weights may be TQ2_0, TQ1_0, F16 or F32 (ternary codes
// times one scale per tensor: the `.scale` tensor times the blocks' common scale). Refused, each
// in one line naming the file: another architecture, a tokenizer hybrit did not export,
// other tensor types, block scales that differ within a tensor, values that are not ternary,
// a truncated or malformed file.
bool is_gguf_file(const std::string& path);
InferenceExport read_gguf_model(Dispatcher& dispatcher, const std::string& path);

}  // namespace hybrit

