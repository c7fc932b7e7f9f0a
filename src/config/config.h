// The run configuration: typed structs filled from YAML plus `--set key.path=value` overrides.
// Every key, its type, default and meaning is listed in docs/config.md; the schema in
// config.cpp is the single source of the key list (tests check the doc against it).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "precision/fp8_scaling.h"
#include "precision/loss_scaler.h"

namespace mpt {

struct ModelConfig {
  int n_layer = 4;
  int n_head = 4;
  int n_embd = 128;
  int vocab_size = 256;          // real vocabulary; the embedding is padded (see below)
  int vocab_pad_multiple = 64;   // padded vocab = vocab_size rounded up to this multiple
  int max_seq_len = 64;          // positions in the learned position embedding
  uint64_t init_seed = 1337;
  double init_std = 0.02;

  int padded_vocab() const {
    return (vocab_size + vocab_pad_multiple - 1) / vocab_pad_multiple * vocab_pad_multiple;
  }
};

struct DataConfig {
  // Each entry is a path or glob of llm.c-format token shards, or the word "builtin" for the
  // built-in corpus (its train split for `train`, its validation split for `val`).
  std::vector<std::string> train{"builtin"};
  std::vector<std::string> val{"builtin"};
};

struct TrainingConfig {
  int micro_batch = 8;    // sequences per micro-batch (B)
  int seq_len = 64;       // tokens per sequence (T), at most model.max_seq_len
  int grad_accum = 1;     // micro-batches per optimizer step
  // Tokens per optimizer step over all processes; 0 = micro_batch * seq_len * grad_accum *
  // processes. When set, grad_accum is derived from it (and the number of processes), so the same
  // config means the same training on any number of processes.
  int64_t global_batch_tokens = 0;
  int64_t steps = 300;    // optimizer steps
  int64_t eval_every = 50;  // steps between validation passes; 0 = only at start and end
  int eval_batches = 8;     // micro-batches per validation pass
  int64_t log_every = 10;   // steps between step records
  uint64_t seed = 42;       // data order
  // Activations the backward recomputes instead of keeping: none | gelu | gelu+layernorm
  // (model/gpt.h, Recompute). Less activation memory for one more pass over them; the same
  // results (but on a GPU under tf32: model/gpt.h).
  std::string recompute = "none";
};

struct OptimizerConfig {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
  double grad_clip = 1.0;  // global-norm clip; 0 disables
};

struct ScheduleConfig {
  std::string decay = "cosine";  // cosine | linear | constant
  int64_t warmup_steps = 20;
  double min_lr = 1e-4;
};

struct CheckpointConfig {
  int64_t every = 100;     // steps between checkpoints; 0 = only at the end (and on a signal)
  int keep_last = 3;       // newest checkpoints kept
  int64_t keep_every = 0;  // also keep every checkpoint whose step is a multiple of this; 0 = none
};

// Data-parallel training (several processes under mpirun or srun; docs/distributed.md).
struct DistributedConfig {
  // 0: every process keeps the whole optimizer state. 1: ZeRO stage 1 (Rajbhandari et al.,
  // "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models", SC 2020): each
  // process keeps and updates 1/N of the master weights and AdamW moments, then the updated
  // weights are gathered.
  int zero_stage = 0;
};

struct OutputConfig {
  std::string dir = "runs";
  std::string name;  // empty: "<config file stem>-<UTC timestamp>"
};

// Overrides of the precision preset, per tensor role. "preset" keeps the preset's choice; the
// resolved policy is PrecisionPolicy::from_config (docs/precision.md, "Overriding a preset").
struct DtypesConfig {
  std::string param = "preset";       // preset | fp32 | fp16 | bf16
  std::string activation = "preset";  // preset | fp32 | fp16 | bf16
  std::string grad = "preset";        // preset | fp32 | fp16 | bf16
  std::string master = "preset";      // preset | fp32 | none
};

// The `loss_scale` section: LossScalerConfig's fields with its defaults, except that the mode
// defaults to "preset" (the preset's mode: dynamic for fp16, none otherwise). Deriving keeps the
// defaults in one place.
struct LossScaleConfig : LossScalerConfig {
  LossScaleConfig() { mode = "preset"; }
};

// The `fp8` section (precision fp8 only): Fp8Recipe in the config's words. The defaults are
// Fp8Recipe's; tests/test_policy.cpp checks that they resolve to the fp8 preset's recipe.
struct Fp8Config {
  std::string format = "hybrid";          // hybrid (e4m3 forward, e5m2 gradients) | e4m3
  Fp8ScalingConfig scaling;               // recipe, amax_history_len, amax_compute, margin
  std::string lm_head = "bf16";           // bf16 | fp8: the tied LM head's GEMM
  std::string first_last_blocks = "fp8";  // fp8 | bf16: the first and last blocks' GEMMs
};

struct Config {
  ModelConfig model;
  DataConfig data;
  TrainingConfig training;
  OptimizerConfig optimizer;
  ScheduleConfig schedule;
  CheckpointConfig checkpoint;
  std::string precision = "fp32";  // the preset; dtypes, loss_scale and fp8 override it
  DtypesConfig dtypes;
  LossScaleConfig loss_scale;
  Fp8Config fp8;
  std::string backend = "auto";  // cpu | cuda | auto
  int threads = 0;               // CPU threads; 0 = all available cores
  DistributedConfig distributed;
  OutputConfig output;

  std::string source_path;  // the YAML file this came from ("" for the built-in default)
};

// Loads `path` (or the built-in default config when `path` is empty), applies the overrides
// ("key.path=value", YAML-typed), and validates everything. On any problem throws InputError
// whose message lists every error found, each with file:line:column (or "--set KEY") and the
// full key path. Does not touch the file system except to read the config and expand globs.
Config load_config(const std::string& path, const std::vector<std::string>& overrides = {});

// The fully resolved config as YAML (round-trips through load_config) and as JSON.
std::string config_to_yaml(const Config& c);
nlohmann::json config_to_json(const Config& c);

// A config as config_to_json writes it, flattened to key paths ("model.n_layer" -> 4), for
// comparing two runs' configs key by key.
std::map<std::string, nlohmann::json> flatten_config(const nlohmann::json& j);

// One entry per documented key, for docs and tests: "model.n_layer", ...
struct ConfigKeyInfo {
  std::string path;
  std::string type;
  std::string default_value;
  std::string description;
  std::string allowed;  // the accepted values, e.g. ">= 1", "in [0, 1)", "one of cpu, cuda, auto"
};
const std::vector<ConfigKeyInfo>& config_schema();

}  // namespace mpt
