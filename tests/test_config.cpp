// Tests of the config module: defaults, every class of bad input (with its location and hint),
// --set overrides, the YAML/JSON dumps, and that docs/config.md documents every key.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <functional>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "config/config.h"
#include "data/dataset.h"
#include "core/error.h"
#include "precision/policy.h"

namespace fs = std::filesystem;
using mpt::Config;
using mpt::InputError;
using mpt::load_config;

namespace {

const Config kDefaults;  // the struct defaults from config.h

// A fresh directory per test, removed with everything in it at the end.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "mpt_test_config_XXXXXX").string();
    path_ = mkdtemp(tmpl.data());
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string write(const std::string& name, const std::string& text) const {
    const fs::path p = fs::path(path_) / name;
    fs::create_directories(p.parent_path());
    std::ofstream(p) << text;
    return p.string();
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// The InputError message load_config throws, or a test failure when it does not throw.
std::string load_error(const std::string& path, const std::vector<std::string>& overrides = {}) {
  try {
    load_config(path, overrides);
  } catch (const InputError& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected InputError loading '" << path << "'";
  return "";
}

std::string replace_all(std::string s, const std::string& from, const std::string& to) {
  for (size_t pos = 0; (pos = s.find(from, pos)) != std::string::npos; pos += to.size())
    s.replace(pos, from.size(), to);
  return s;
}

// Changes the working directory for one scope (relative data paths resolve against it).
class ScopedCwd {
 public:
  explicit ScopedCwd(const std::string& dir) : old_(fs::current_path()) { fs::current_path(dir); }
  ~ScopedCwd() { fs::current_path(old_); }

 private:
  fs::path old_;
};

TEST(Config, DefaultsWithoutFile) {
  const Config c = load_config("");
  EXPECT_EQ(config_to_json(c), config_to_json(kDefaults));
  EXPECT_EQ(c.source_path, "");
  EXPECT_EQ(c.model.n_layer, 4);
  EXPECT_EQ(c.precision, "fp32");
  EXPECT_EQ(c.data.train, std::vector<std::string>{"builtin"});
}

TEST(Config, DefaultYamlEqualsBuiltInDefaults) {
  const std::string path = std::string(MPT_SOURCE_DIR) + "/configs/default.yaml";
  const Config c = load_config(path);
  EXPECT_EQ(config_to_json(c), config_to_json(kDefaults));
  EXPECT_EQ(c.source_path, path);
}

TEST(Config, EmptyFileAndEmptySectionsKeepDefaults) {
  TempDir dir;
  for (const char* text : {"", "# only a comment\n", "model:\ntraining:\n"}) {
    const Config c = load_config(dir.write("c.yaml", text));
    EXPECT_EQ(config_to_json(c), config_to_json(kDefaults)) << "text: " << text;
  }
}

TEST(Config, FileValuesAreApplied) {
  TempDir dir;
  dir.write("shards/train_000.bin", "x");
  dir.write("shards/train_001.bin", "x");
  const std::string path = dir.write("c.yaml",
                                     "model:\n  n_layer: 2\n  init_std: 0.01\n"
                                     "data:\n  train: " + dir.path() + "/shards/train_*.bin\n"
                                     "training:\n  steps: 20\n  seed: 18446744073709551615\n"
                                     "schedule:\n  decay: linear\nbackend: cpu\n");
  const Config c = load_config(path);
  EXPECT_EQ(c.model.n_layer, 2);
  EXPECT_EQ(c.model.init_std, 0.01);
  EXPECT_EQ(c.data.train, std::vector<std::string>{dir.path() + "/shards/train_*.bin"});
  EXPECT_EQ(c.training.steps, 20);
  EXPECT_EQ(c.training.seed, UINT64_MAX);
  EXPECT_EQ(c.schedule.decay, "linear");
  EXPECT_EQ(c.backend, "cpu");
  EXPECT_EQ(c.model.n_head, 4);  // untouched keys keep their defaults
}

TEST(Config, MissingFileIsAnInputError) {
  const std::string msg = load_error("/nonexistent/config.yaml");
  EXPECT_NE(msg.find("invalid config /nonexistent/config.yaml:"), std::string::npos) << msg;
  EXPECT_NE(msg.find("cannot open"), std::string::npos) << msg;
}

// One bad config: the YAML text and substrings the error message must contain. "{F}" stands for
// the config file's path.
struct BadCase {
  const char* name;
  const char* yaml;
  std::vector<std::string> expected;
};

const std::vector<BadCase> kBadCases = {
    // Unknown keys, with a did-you-mean at the same level or across sections.
    {"unknown_key", "model:\n  n_layers: 4\n",
     {"{F}:2:3: model.n_layers: unknown key (did you mean 'n_layer'?)"}},
    {"unknown_key_transposed", "training:\n  stpes: 4\n",
     {"{F}:2:3: training.stpes: unknown key (did you mean 'steps'?)"}},
    {"unknown_section_typo", "modle:\n  n_layer: 2\n",
     {"{F}:1:1: modle: unknown key (did you mean 'model'?)"}},
    {"unknown_section", "foo:\n  bar: 1\n",
     {"{F}:1:1: foo: unknown key (known here: model, data, training"}},
    {"key_in_wrong_section", "model:\n  lr: 0.1\n",
     {"{F}:2:3: model.lr: unknown key (did you mean 'optimizer.lr'?)"}},
    {"duplicate_key", "model:\n  n_layer: 2\n  n_layer: 3\n",
     {"{F}:3:3: model.n_layer: duplicate key (first given at {F}:2:3)"}},
    // Structure and types.
    {"top_level_not_map", "- a\n- b\n", {"{F}:1:1: the top level must be a map"}},
    {"section_not_map", "model: 4\n", {"{F}:1:8: model: expected a map of keys, got '4'"}},
    {"wrong_type_integer", "model:\n  n_layer: four\n",
     {"{F}:2:12: model.n_layer: expected an integer, got 'four'"}},
    {"fraction_for_integer", "training:\n  steps: 3.5\n",
     {"{F}:2:10: training.steps: expected an integer, got '3.5'"}},
    {"quoted_integer", "model:\n  n_head: \"4\"\n",
     {"model.n_head: expected an integer, got the quoted string '4'"}},
    {"str_tagged_integer", "model:\n  n_layer: !!str 3\n",
     {"model.n_layer: expected an integer, got the string (!!str) '3'"}},
    {"null_value", "model:\n  n_layer:\n",
     {"{F}:2:3: model.n_layer: expected an integer, got nothing"}},
    {"list_for_number", "optimizer:\n  lr: [1]\n",
     {"{F}:2:7: optimizer.lr: expected a number, got a list"}},
    {"word_for_number", "optimizer:\n  eps: tiny\n",
     {"optimizer.eps: expected a number, got 'tiny'"}},
    {"map_for_string", "output:\n  dir: {a: 1}\n", {"output.dir: expected a string, got a map"}},
    {"int32_overflow", "model:\n  n_layer: 3000000000\n",
     {"model.n_layer: '3000000000' does not fit in a 32-bit integer"}},
    {"negative_seed", "training:\n  seed: -1\n",
     {"training.seed: expected a non-negative integer, got '-1'"}},
    {"list_entry_not_string", "data:\n  train: [[a]]\n",
     {"{F}:2:11: data.train[0]: expected a string, got a list"}},
    // Non-finite numbers.
    {"nan", "optimizer:\n  lr: .nan\n",
     {"{F}:2:7: optimizer.lr: must be a finite number, got '.nan'"}},
    {"inf", "model:\n  init_std: .inf\n", {"model.init_std: must be a finite number, got '.inf'"}},
    {"overflowing_double", "optimizer:\n  eps: 1e999\n",
     {"optimizer.eps: must be a finite number, got '1e999'"}},
    {"underflowing_double", "optimizer:\n  eps: 1e-400\n",
     {"optimizer.eps: '1e-400' is too small for a double (it would become 0)"}},
    // Ranges.
    {"n_layer_zero", "model:\n  n_layer: 0\n", {"{F}:2:12: model.n_layer: must be >= 1, got 0"}},
    {"vocab_too_large", "model:\n  vocab_size: 70000\n",
     {"model.vocab_size: must be in [2, 65536], got 70000"}},
    {"beta1_one", "optimizer:\n  beta1: 1.0\n", {"optimizer.beta1: must be in [0, 1), got 1"}},
    {"lr_zero", "optimizer:\n  lr: 0\n", {"optimizer.lr: must be > 0, got 0"}},
    {"negative_eval_every", "training:\n  eval_every: -1\n",
     {"training.eval_every: must be >= 0, got -1"}},
    {"negative_threads", "threads: -2\n", {"{F}:1:10: threads: must be in [0, 1024], got -2"}},
    // Constraints between two keys name both keys and values.
    {"n_embd_not_divisible", "model:\n  n_head: 4\n  n_embd: 102\n",
     {"{F}:3:11: model.n_embd: 102 is not divisible by model.n_head (4)"}},
    {"n_head_zero_skips_divisibility", "model:\n  n_head: 0\n",
     {"{F}:2:11: model.n_head: must be >= 1, got 0"}},
    {"n_head_breaks_divisibility", "model:\n  n_head: 3\n",
     {"{F}:2:11: model.n_embd: 128 is not divisible by model.n_head (3)"}},
    {"seq_len_too_long", "training:\n  seq_len: 128\n",
     {"{F}:2:12: training.seq_len: 128 exceeds model.max_seq_len (64)"}},
    {"min_lr_above_lr", "schedule:\n  min_lr: 0.01\n",
     {"schedule.min_lr: 0.01 is greater than optimizer.lr (0.001)"}},
    {"global_batch_not_whole_micro_batches", "training:\n  global_batch_tokens: 1000\n",
     {"{F}:2:24: training.global_batch_tokens: 1000 is not a multiple of training.micro_batch x "
      "training.seq_len (512 tokens per micro-batch)"}},
    {"global_batch_with_grad_accum", "training:\n  grad_accum: 2\n  global_batch_tokens: 1024\n",
     {"training.global_batch_tokens: 1024 is set, so training.grad_accum is derived from it and "
      "must be left at 1 (it is 2)"}},
    // Strings reach JSON records: UTF-8 only.
    {"output_name_not_utf8", "output:\n  name: caf\xe9\n",
     {"output.name: is not valid UTF-8 text"}},
    {"data_entry_not_utf8", "data:\n  train: [builtin, \"d\xc3\"]\n",
     {"data.train[1]: is not valid UTF-8 text"}},
    // fp8 GEMMs need dimensions in multiples of 16, on every backend.
    {"fp8_n_embd_off_16", "precision: fp8\nmodel:\n  n_head: 3\n  n_embd: 120\n",
     {"{F}:4:11: model.n_embd: 120 is not a multiple of 16, which precision fp8 needs"}},
    {"fp8_tokens_off_16", "precision: fp8\ntraining:\n  micro_batch: 3\n  seq_len: 21\n",
     {"{F}:3:16: training.micro_batch: training.micro_batch x training.seq_len (3 x 21 = 63 "
      "tokens) is not a multiple of 16, which precision fp8 needs"}},
    {"fp8_lm_head_vocab_off_16",
     "precision: fp8\nmodel:\n  vocab_pad_multiple: 1\n  vocab_size: 250\nfp8:\n  lm_head: fp8\n",
     {"model.vocab_pad_multiple: 1 pads the vocabulary to 250, not a multiple of 16, which "
      "fp8.lm_head: fp8 needs"}},
    {"zero_stage_two", "distributed:\n  zero_stage: 2\n",
     {"{F}:2:15: distributed.zero_stage: must be in [0, 1], got 2"}},
    // Enumerations list their choices; known but unimplemented precisions say so.
    {"unknown_decay", "schedule:\n  decay: cosin\n",
     {"{F}:2:10: schedule.decay: unknown value 'cosin' (did you mean 'cosine'? choices: cosine, "
      "linear, constant)"}},
    {"unknown_backend", "backend: gpu\n",
     {"backend: unknown value 'gpu'", "choices: cpu, cuda, auto"}},
    {"unknown_precision", "precision: fp64\n",
     {"precision: unknown value 'fp64'", "fp32, tf32, fp16, bf16, bf16-pure, fp8"}},
    // Data entries must match files; output.name must be one path component.
    {"missing_data_file", "data:\n  train: [builtin, /nonexistent/dir/*.bin]\n",
     {"{F}:2:20: data.train: '/nonexistent/dir/*.bin' matches no existing file"}},
    {"missing_data_file_single_string", "data:\n  val: no_such_shard.bin\n",
     {"{F}:2:8: data.val: 'no_such_shard.bin' matches no existing file",
      "relative to the current directory"}},
    {"empty_data_list", "data:\n  train: []\n", {"{F}:2:10: data.train: empty list"}},
    {"output_name_with_slash", "output:\n  name: a/b\n",
     {"{F}:2:9: output.name: must be a single path component"}},
    {"output_name_dotdot", "output:\n  name: ..\n",
     {"output.name: must be a single path component"}},
    {"empty_output_dir", "output:\n  dir: \"\"\n", {"output.dir: must not be empty"}},
    {"output_name_too_long", "output:\n  name: nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn\n",
     {"{F}:2:9: output.name: must be at most 255 bytes (a file name), got 256"}},
    // A key below one that holds a value.
    {"key_below_a_value", "model:\n  n_layer:\n    x: 3\n",
     {"{F}:3:5: model.n_layer: expected an integer, got a map"}},
    // Syntax errors carry the parser's line and column.
    {"bad_yaml", "model:\n  n_layer: 4\n n_head: 2\n",
     {"{F}:3:2: invalid YAML: end of map not found"}},
    {"two_documents", "model: {}\n---\nmodel: {}\n", {"{F}: holds 2 YAML documents"}},
    // Precision overrides: values, booleans, and combinations PrecisionPolicy rejects, each at
    // the line of the key (or of `precision` when the key itself was not written).
    {"unknown_dtype", "dtypes:\n  param: fp64\n",
     {"{F}:2:10: dtypes.param: unknown value 'fp64'", "choices: preset, fp32, fp16, bf16)"}},
    {"unknown_fp8_recipe", "precision: fp8\nfp8:\n  recipe: just_in_time\n",
     {"{F}:3:11: fp8.recipe: unknown value 'just_in_time'", "choices: delayed, current)"}},
    {"boolean_yes", "loss_scale:\n  consecutive_hysteresis: yes\n",
     {"{F}:2:27: loss_scale.consecutive_hysteresis: expected true or false, got 'yes'"}},
    {"boolean_quoted", "loss_scale:\n  consecutive_hysteresis: \"true\"\n",
     {"loss_scale.consecutive_hysteresis: expected true or false, got the quoted string 'true'"}},
    {"boolean_number", "loss_scale:\n  consecutive_hysteresis: 1\n",
     {"loss_scale.consecutive_hysteresis: expected true or false, got '1'"}},
    {"master_of_fp32_weights", "dtypes:\n  master: fp32\n",
     {"{F}:2:11: dtypes.master: fp32 with fp32 weights (dtypes.param resolves to fp32 for "
      "precision fp32): a master copy of fp32 weights is pointless"}},
    {"loss_scale_range", "precision: fp16\nloss_scale:\n  backoff_factor: 1\n",
     {"{F}:3:19: loss_scale.backoff_factor: must be in (0, 1), got 1"}},
    {"loss_scale_cross_field", "precision: fp16\nloss_scale:\n  min_scale: 8\n  max_scale: 4\n",
     {"{F}:4:14: loss_scale.max_scale: must be finite and >= min_scale (8), got 4"}},
    {"problem_at_precision_when_key_not_set", "precision: fp16\nloss_scale:\n  min_scale: 131072\n",
     {"{F}:1:12: loss_scale.init_scale: must be within [min_scale, max_scale] = [131072, "
      "16777216], got 65536"}},
    {"fp8_keys_without_fp8", "precision: bf16\nfp8:\n  recipe: current\n",
     {"{F}:3:11: fp8.recipe: current has no effect: fp8.* applies to precision fp8 only "
      "(precision is 'bf16')"}},
    {"loss_scale_without_scaling", "precision: bf16\nloss_scale:\n  init_scale: 1024\n",
     {"{F}:3:15: loss_scale.init_scale: 1024 has no effect: loss scaling is off "
      "(loss_scale.mode resolves to none for precision bf16)"}},
    {"loss_scale_turned_off", "precision: fp16\nloss_scale:\n  mode: none\n  growth_interval: 10\n",
     {"{F}:4:20: loss_scale.growth_interval: 10 has no effect: loss scaling is off "
      "(loss_scale.mode: none)"}},
    {"dynamic_field_in_static_mode",
     "precision: fp16\nloss_scale:\n  mode: static\n  hysteresis: 2\n",
     {"{F}:4:15: loss_scale.hysteresis: 2 has no effect: it applies to loss_scale.mode: dynamic; "
      "with static, the scale stays at loss_scale.init_scale"}},
    {"history_with_current_scaling",
     "precision: fp8\nfp8:\n  recipe: current\n  amax_history_len: 4\n",
     {"{F}:4:21: fp8.amax_history_len: 4 has no effect: it applies to fp8.recipe: delayed"}},
    {"many_precision_errors",
     "precision: fp16\ndtypes:\n  param: fp32\n  master: fp32\nloss_scale:\n  growth_factor: 1\n"
     "fp8:\n  margin: 2\n",
     {"{F}:4:11: dtypes.master: fp32 with fp32 weights", "{F}:6:18: loss_scale.growth_factor: "
      "must be > 1, got 1", "{F}:8:11: fp8.margin: 2 has no effect"}},
    // Everything wrong is reported at once.
    {"many_errors", "model:\n  n_layers: 4\n  n_head: x\ntraining:\n  steps: 0\nprecision: fp12\n",
     {"{F}:2:3: model.n_layers: unknown key", "{F}:3:11: model.n_head: expected an integer",
      "{F}:5:10: training.steps: must be >= 1, got 0",
      "{F}:6:12: precision: unknown value 'fp12'"}},
};

void PrintTo(const BadCase& c, std::ostream* os) { *os << c.name; }

class BadConfig : public ::testing::TestWithParam<BadCase> {};

TEST_P(BadConfig, ReportsEveryExpectedPart) {
  const BadCase& bad = GetParam();
  TempDir dir;
  const std::string path = dir.write("bad.yaml", bad.yaml);
  const std::string msg = load_error(path);
  EXPECT_EQ(msg.rfind("invalid config " + path + ":\n", 0), 0u) << msg;
  for (const auto& part : bad.expected) {
    const std::string want = replace_all(part, "{F}", path);
    EXPECT_NE(msg.find(want), std::string::npos) << "missing: " << want << "\nin: " << msg;
  }
}

INSTANTIATE_TEST_SUITE_P(Config, BadConfig, ::testing::ValuesIn(kBadCases),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(Config, ManyErrorsGiveOneLineEach) {
  TempDir dir;
  const std::string msg = load_error(
      dir.write("c.yaml", "model:\n  n_layers: 4\n  n_head: x\ntraining:\n  steps: 0\n"));
  EXPECT_EQ(std::count(msg.begin(), msg.end(), '\n'), 3) << msg;
}

// A value already rejected by its key's range is not reported again by the precision checks
// (the loss scaler would say the same thing), nor is a key without effect checked further.
TEST(Config, PrecisionProblemsAreNotRepeated) {
  TempDir dir;
  std::string msg = load_error(
      dir.write("c.yaml", "precision: fp16\nloss_scale:\n  backoff_factor: 1\n"));
  EXPECT_EQ(std::count(msg.begin(), msg.end(), '\n'), 1) << msg;
  msg = load_error(dir.write("c.yaml",
                             "precision: fp16\nloss_scale:\n  mode: static\n  min_scale: 8\n"
                             "  max_scale: 4\n"));
  EXPECT_EQ(std::count(msg.begin(), msg.end(), '\n'), 2) << msg;
  EXPECT_EQ(msg.find("must be finite"), std::string::npos) << msg;
}

// The multiples of 16 bind fp8 only: other precisions take any width and batch.
TEST(Config, Fp8MultiplesOf16BindFp8Alone) {
  TempDir dir;
  const std::string odd =
      "model:\n  n_head: 3\n  n_embd: 120\n  vocab_pad_multiple: 1\n  vocab_size: 250\n"
      "training:\n  micro_batch: 3\n  seq_len: 21\n";
  for (const char* p : {"fp32", "tf32", "fp16", "bf16", "bf16-pure"})
    EXPECT_NO_THROW(load_config(dir.write("c.yaml", std::string("precision: ") + p + "\n" + odd)))
        << p;
  // fp8 with the multiples, and with an odd padded vocabulary when the LM head stays bf16.
  const Config c = load_config(dir.write(
      "c.yaml", "precision: fp8\nmodel:\n  n_head: 3\n  n_embd: 48\n  vocab_pad_multiple: 1\n"
                "  vocab_size: 250\ntraining:\n  micro_batch: 3\n  seq_len: 16\n"));
  EXPECT_EQ(c.model.n_embd, 48);
  EXPECT_NO_THROW(load_config(dir.write(
      "c.yaml", "precision: fp8\nmodel:\n  vocab_pad_multiple: 16\n  vocab_size: 250\n"
                "fp8:\n  lm_head: fp8\n")));
}

// Keys the policy does not use may still be written with their default values: a config written
// out in full (configs/default.yaml, a run's config.yaml) names every key.
TEST(Config, UnusedPrecisionKeysMayKeepTheirDefaults) {
  TempDir dir;
  const Config c = load_config(dir.write(
      "c.yaml", "precision: bf16\nloss_scale:\n  init_scale: 65536\n  growth_factor: 2\n"
                "  max_consecutive_min_scale_skips: 3\nfp8:\n  recipe: delayed\n  margin: 0\n"));
  EXPECT_EQ(c.precision, "bf16");
  // Stopping after overflow steps in a row works without loss scaling too.
  EXPECT_EQ(c.loss_scale.max_consecutive_min_scale_skips, 3);
}

// Every key of the precision sections, with a value other than its default; all valid together
// (fp8 with dynamic loss scaling, which is legal though pointless).
struct OverrideKey {
  const char* path;
  const char* yaml;
  nlohmann::json expected;
};
const std::vector<OverrideKey> kOverrideKeys = {
    {"dtypes.param", "fp16", "fp16"},
    {"dtypes.activation", "fp16", "fp16"},
    {"dtypes.grad", "bf16", "bf16"},
    {"dtypes.master", "fp32", "fp32"},
    {"loss_scale.mode", "dynamic", "dynamic"},
    {"loss_scale.init_scale", "1024", 1024.0},
    {"loss_scale.growth_factor", "4", 4.0},
    {"loss_scale.backoff_factor", "0.25", 0.25},
    {"loss_scale.growth_interval", "500", 500},
    {"loss_scale.hysteresis", "2", 2},
    {"loss_scale.consecutive_hysteresis", "true", true},
    {"loss_scale.min_scale", "0.5", 0.5},
    {"loss_scale.max_scale", "65536", 65536.0},
    {"loss_scale.max_consecutive_min_scale_skips", "4", 4},
    {"fp8.format", "e4m3", "e4m3"},
    {"fp8.recipe", "delayed", "delayed"},
    {"fp8.amax_history_len", "32", 32},
    {"fp8.amax_compute", "most_recent", "most_recent"},
    {"fp8.margin", "1", 1},
    {"fp8.lm_head", "fp8", "fp8"},
    {"fp8.first_last_blocks", "bf16", "bf16"},
};

TEST(Config, EveryPrecisionOverrideKeyParses) {
  TempDir dir;
  std::string text = "precision: fp8\n", section;
  for (const auto& k : kOverrideKeys) {
    const std::string path = k.path;
    const size_t dot = path.find('.');
    if (path.substr(0, dot) != section) {
      section = path.substr(0, dot);
      text += section + ":\n";
    }
    text += "  " + path.substr(dot + 1) + ": " + k.yaml + "\n";
  }
  const Config c = load_config(dir.write("c.yaml", text));
  const auto flat = mpt::flatten_config(config_to_json(c));
  for (const auto& k : kOverrideKeys) EXPECT_EQ(flat.at(k.path), k.expected) << k.path;
  // The same values as --set overrides.
  std::vector<std::string> sets = {"precision=fp8"};
  for (const auto& k : kOverrideKeys) sets.push_back(std::string(k.path) + "=" + k.yaml);
  EXPECT_EQ(config_to_json(load_config("", sets)), config_to_json(c));
  // And through the YAML dump.
  const std::string dump = config_to_yaml(c);
  EXPECT_NE(dump.find("  consecutive_hysteresis: true\n"), std::string::npos) << dump;
  EXPECT_EQ(config_to_json(load_config(dir.write("dump.yaml", dump))), config_to_json(c)) << dump;
}

TEST(Config, BooleansAcceptYamlTrueAndFalseOnly) {
  const std::string key = "loss_scale.consecutive_hysteresis=";
  for (const char* t : {"true", "True", "TRUE"})
    EXPECT_TRUE(load_config("", {"precision=fp16", key + t}).loss_scale.consecutive_hysteresis)
        << t;
  for (const char* f : {"false", "False", "FALSE"})
    EXPECT_FALSE(load_config("", {"precision=fp16", key + f}).loss_scale.consecutive_hysteresis)
        << f;
  for (const char* bad : {"yes", "no", "on", "off", "y", "1", "0", "\"true\"", "[true]"}) {
    const std::string msg = load_error("", {"precision=fp16", key + bad});
    EXPECT_NE(msg.find("expected true or false, got"), std::string::npos) << bad << ": " << msg;
  }
  EXPECT_EQ(config_to_json(kDefaults)["loss_scale"]["consecutive_hysteresis"], false);
  EXPECT_NE(config_to_yaml(kDefaults).find("  consecutive_hysteresis: false\n"), std::string::npos);
}

// The table's ranges (which report every bad value at once, at its line) and the scalers' own
// validation (which from_config relies on for configs built in code) must agree: each value
// outside a range is rejected by both, at the same key, and each range's ends are accepted by
// both.
TEST(Config, PrecisionRangesAgreeWithTheScalers) {
  struct Case {
    std::vector<std::string> sets;  // the value, and the mode that makes the key take effect
    std::function<void(Config&)> apply;
    const char* key;
    bool valid;
  };
  using C = Config&;
  const std::vector<Case> cases = {
      {{"precision=fp16", "loss_scale.init_scale=0"}, [](C c) { c.loss_scale.init_scale = 0; },
       "loss_scale.init_scale", false},
      {{"precision=fp16", "loss_scale.growth_factor=1"},
       [](C c) { c.loss_scale.growth_factor = 1; }, "loss_scale.growth_factor", false},
      {{"precision=fp16", "loss_scale.backoff_factor=0"},
       [](C c) { c.loss_scale.backoff_factor = 0; }, "loss_scale.backoff_factor", false},
      {{"precision=fp16", "loss_scale.backoff_factor=1"},
       [](C c) { c.loss_scale.backoff_factor = 1; }, "loss_scale.backoff_factor", false},
      {{"precision=fp16", "loss_scale.growth_interval=0"},
       [](C c) { c.loss_scale.growth_interval = 0; }, "loss_scale.growth_interval", false},
      {{"precision=fp16", "loss_scale.growth_interval=1"},
       [](C c) { c.loss_scale.growth_interval = 1; }, "loss_scale.growth_interval", true},
      {{"precision=fp16", "loss_scale.hysteresis=0"}, [](C c) { c.loss_scale.hysteresis = 0; },
       "loss_scale.hysteresis", false},
      {{"precision=fp16", "loss_scale.min_scale=0"}, [](C c) { c.loss_scale.min_scale = 0; },
       "loss_scale.min_scale", false},
      {{"precision=fp16", "loss_scale.max_scale=0"}, [](C c) { c.loss_scale.max_scale = 0; },
       "loss_scale.max_scale", false},
      {{"precision=fp16", "loss_scale.max_consecutive_min_scale_skips=0"},
       [](C c) { c.loss_scale.max_consecutive_min_scale_skips = 0; },
       "loss_scale.max_consecutive_min_scale_skips", false},
      {{"precision=fp16", "loss_scale.max_consecutive_min_scale_skips=1"},
       [](C c) { c.loss_scale.max_consecutive_min_scale_skips = 1; },
       "loss_scale.max_consecutive_min_scale_skips", true},
      {{"precision=fp8", "fp8.amax_history_len=0"},
       [](C c) { c.fp8.scaling.amax_history_len = 0; }, "fp8.amax_history_len", false},
      {{"precision=fp8", "fp8.amax_history_len=1"},
       [](C c) { c.fp8.scaling.amax_history_len = 1; }, "fp8.amax_history_len", true},
      {{"precision=fp8", "fp8.amax_history_len=65536"},
       [](C c) { c.fp8.scaling.amax_history_len = 65536; }, "fp8.amax_history_len", true},
      {{"precision=fp8", "fp8.amax_history_len=65537"},
       [](C c) { c.fp8.scaling.amax_history_len = 65537; }, "fp8.amax_history_len", false},
      {{"precision=fp8", "fp8.margin=-1"}, [](C c) { c.fp8.scaling.margin = -1; }, "fp8.margin",
       false},
      {{"precision=fp8", "fp8.margin=16"}, [](C c) { c.fp8.scaling.margin = 16; }, "fp8.margin",
       true},
      {{"precision=fp8", "fp8.margin=17"}, [](C c) { c.fp8.scaling.margin = 17; }, "fp8.margin",
       false},
  };
  for (const auto& e : cases) {
    SCOPED_TRACE(e.sets.back());
    Config direct;
    direct.precision = e.sets.front().substr(std::string("precision=").size());
    e.apply(direct);
    bool scaler_accepts = true;
    try {
      mpt::PrecisionPolicy::from_config(direct);
    } catch (const InputError& err) {
      scaler_accepts = false;
      EXPECT_NE(std::string(err.what()).find(std::string("\n  ") + e.key + ": "),
                std::string::npos)
          << err.what();
    }
    EXPECT_EQ(scaler_accepts, e.valid);
    if (e.valid) {
      EXPECT_NO_THROW(load_config("", e.sets));
    } else {
      const std::string msg = load_error("", e.sets);
      EXPECT_NE(msg.find("  --set " + e.sets.back() + ": must be"), std::string::npos) << msg;
    }
  }
}

TEST(Config, TypedOverrides) {
  TempDir dir;
  dir.write("a.bin", "x");
  dir.write("b.bin", "x");
  const Config c = load_config(
      "", {"training.steps=20", "data.train=[" + dir.path() + "/a.bin, " + dir.path() + "/b.bin]",
           "precision=fp32", "optimizer.lr=3e-4", "output.name=", "model={n_layer: 2, n_head: 2}",
           "training.seed = 7"});
  EXPECT_EQ(c.training.steps, 20);
  EXPECT_EQ(c.data.train,
            (std::vector<std::string>{dir.path() + "/a.bin", dir.path() + "/b.bin"}));
  EXPECT_EQ(c.precision, "fp32");
  EXPECT_EQ(c.optimizer.lr, 3e-4);
  EXPECT_EQ(c.output.name, "");
  EXPECT_EQ(c.model.n_layer, 2);
  EXPECT_EQ(c.model.n_head, 2);
  EXPECT_EQ(c.training.seed, 7u);
}

TEST(Config, PrecisionOverridesFromTheCommandLine) {
  const Config c = load_config("", {"precision=fp16", "dtypes.master=none",
                                    "loss_scale={mode: static, init_scale: 128}"});
  EXPECT_EQ(c.dtypes.master, "none");
  EXPECT_EQ(c.loss_scale.mode, "static");
  EXPECT_EQ(c.loss_scale.init_scale, 128);
  EXPECT_EQ(c.loss_scale.growth_factor, 2);  // untouched keys keep their defaults
  // An override can also fix the file: the setting without effect is gone after it.
  TempDir dir;
  const std::string path = dir.write("c.yaml", "precision: bf16\nfp8:\n  margin: 2\n");
  EXPECT_NE(load_error(path).find("fp8.margin: 2 has no effect"), std::string::npos);
  EXPECT_EQ(load_config(path, {"precision=fp8"}).fp8.scaling.margin, 2);
}

TEST(Config, OverridesWinOverTheFileAndAreValidatedAfterIt) {
  TempDir dir;
  const std::string path = dir.write("c.yaml", "model:\n  n_layer: 0\ntraining:\n  steps: 5\n");
  // The file's n_layer: 0 would be out of range, but the override replaces it before validation.
  const Config c = load_config(path, {"model.n_layer=3", "training.steps=9"});
  EXPECT_EQ(c.model.n_layer, 3);
  EXPECT_EQ(c.training.steps, 9);
  EXPECT_EQ(c.source_path, path);
}

TEST(Config, BadOverridesAreReportedWithSet) {
  struct Case {
    std::string arg;
    std::string expected;
  };
  const std::vector<Case> cases = {
      {"training.steps=abc", "  --set training.steps=abc: expected an integer, got 'abc'"},
      {"model.n_layer=0", "  --set model.n_layer=0: must be >= 1, got 0"},
      {"model.n_layers=4", "  --set model.n_layers=4: unknown key (did you mean 'model.n_layer'?)"},
      {"optimiser.lr=1", "  --set optimiser.lr=1: unknown key (did you mean 'optimizer'?)"},
      {"precision.x=1", "  --set precision.x=1: unknown key ('precision' is a value, not a section)"},
      {"model.n_layer.x=3",
       "  --set model.n_layer.x=3: unknown key ('model.n_layer' is a value, not a section)"},
      {"training.steps", "  --set training.steps: expected KEY.PATH=VALUE"},
      {"data.train=[a,", "  --set data.train=[a,: invalid YAML value"},
      {"precision=bf17", "  --set precision=bf17: unknown value 'bf17' (did you mean 'bf16'?"},
      {"model={n_layers: 2}", "  --set model={n_layers: 2}: model.n_layers: unknown key"},
      {"data.val=/nonexistent/*.bin",
       "  --set data.val=/nonexistent/*.bin: '/nonexistent/*.bin' matches no existing file"},
      {"dtype.master=none", "  --set dtype.master=none: unknown key (did you mean 'dtypes'?)"},
      {"dtypes.master=fp32", "  --set dtypes.master=fp32: fp32 with fp32 weights"},
      {"fp8.margin=2",
       "  --set fp8.margin=2: 2 has no effect: fp8.* applies to precision fp8 only (precision is "
       "'fp32')"},
      {"loss_scale.consecutive_hysteresis=on",
       "  --set loss_scale.consecutive_hysteresis=on: expected true or false, got 'on'"},
  };
  for (const auto& c : cases) {
    const std::string msg = load_error("", {c.arg});
    EXPECT_EQ(msg.rfind("invalid config (built-in defaults):\n", 0), 0u) << msg;
    EXPECT_NE(msg.find(c.expected), std::string::npos)
        << "want: " << c.expected << "\ngot: " << msg;
  }
}

TEST(Config, RelativeDataPathsResolveAgainstTheWorkingDirectory) {
  TempDir dir;
  dir.write("shards/val_000.bin", "x");
  ScopedCwd cwd(dir.path());
  const Config c = load_config("", {"data.val=shards/val_*.bin"});
  EXPECT_EQ(c.data.val, std::vector<std::string>{"shards/val_*.bin"});
  EXPECT_EQ(mpt::data::glob_files("shards/val_*.bin"),
            std::vector<std::string>{"shards/val_000.bin"});
}

TEST(Config, GlobFilesIsSortedAndSkipsDirectories) {
  TempDir dir;
  dir.write("d/b.bin", "x");
  dir.write("d/a.bin", "x");
  fs::create_directories(fs::path(dir.path()) / "d" / "c.bin");
  const std::string d = dir.path() + "/d/";
  EXPECT_EQ(mpt::data::glob_files(d + "*.bin"),
            (std::vector<std::string>{d + "a.bin", d + "b.bin"}));
  EXPECT_TRUE(mpt::data::glob_files(d + "c.bin").empty());
  EXPECT_TRUE(mpt::data::glob_files(d + "none*.bin").empty());
}

TEST(Config, YamlRoundTripIsExact) {
  TempDir dir;
  dir.write("shards/s_0.bin", "x");
  Config a;
  a.model.n_layer = 6;
  a.model.n_head = 3;
  a.model.n_embd = 96;
  a.model.vocab_size = 50257;
  a.model.vocab_pad_multiple = 128;
  a.model.max_seq_len = 256;
  a.model.init_seed = UINT64_MAX;
  a.model.init_std = 0.012345678901234567;
  a.data.train = {dir.path() + "/shards/s_*.bin", "builtin"};
  a.data.val = {"builtin"};
  a.training.micro_batch = 4;
  a.training.seq_len = 200;
  a.training.grad_accum = 3;
  a.training.steps = 123456789012;
  a.training.eval_every = 0;
  a.training.eval_batches = 2;
  a.training.log_every = 1;
  a.training.seed = 0;
  a.optimizer.lr = 3e-4;
  a.optimizer.beta1 = 0.1;
  a.optimizer.beta2 = 0.999;
  a.optimizer.eps = 1e-10;
  a.optimizer.weight_decay = 0.0;
  a.optimizer.grad_clip = 0.5;
  a.schedule.decay = "linear";
  a.schedule.warmup_steps = 0;
  a.schedule.min_lr = 1.0 / 3.0 * 1e-4;
  a.backend = "cpu";
  a.threads = 2;
  a.output.dir = "my runs/null";
  a.output.name = "null";  // a YAML null word must come back as the string

  const std::string text = config_to_yaml(a);
  EXPECT_NE(text.find("lr: 0.0003"), std::string::npos) << text;
  const Config b = load_config(dir.write("dump.yaml", text));
  EXPECT_EQ(config_to_json(a), config_to_json(b)) << text;
  EXPECT_EQ(b.optimizer.lr, 3e-4);
  EXPECT_EQ(b.optimizer.beta1, 0.1);
  EXPECT_EQ(b.model.init_std, 0.012345678901234567);
  EXPECT_EQ(b.schedule.min_lr, a.schedule.min_lr);
  EXPECT_EQ(b.model.init_seed, UINT64_MAX);
  EXPECT_EQ(b.output.name, "null");
  EXPECT_EQ(b.data.train, a.data.train);
}

TEST(Config, DefaultsRoundTripWithEmptyName) {
  TempDir dir;
  const Config b = load_config(dir.write("dump.yaml", config_to_yaml(kDefaults)));
  EXPECT_EQ(config_to_json(b), config_to_json(kDefaults));
  EXPECT_EQ(b.output.name, "");
}

TEST(Config, JsonIsNestedBySection) {
  Config c;
  c.training.seed = UINT64_MAX;
  const nlohmann::json j = config_to_json(c);
  EXPECT_EQ(j["model"]["n_layer"], 4);
  EXPECT_EQ(j["optimizer"]["lr"], 1e-3);
  EXPECT_TRUE(j["training"]["seed"].is_number_unsigned());
  EXPECT_EQ(j["training"]["seed"].get<uint64_t>(), UINT64_MAX);
  EXPECT_EQ(j["precision"], "fp32");
  EXPECT_EQ(j["data"]["train"], nlohmann::json::array({"builtin"}));
  EXPECT_FALSE(j.contains("source_path"));
}

// The schema must list exactly the fields of the structs in config.h, once each.
TEST(Config, SchemaListsEveryKeyOnce) {
  const std::vector<std::string> expected = {
      "model.n_layer", "model.n_head", "model.n_embd", "model.vocab_size",
      "model.vocab_pad_multiple", "model.max_seq_len", "model.init_seed", "model.init_std",
      "data.train", "data.val", "training.micro_batch", "training.seq_len", "training.grad_accum",
      "training.global_batch_tokens", "training.steps", "training.eval_every", "training.eval_batches", "training.log_every",
      "training.seed", "training.recompute", "optimizer.lr", "optimizer.beta1", "optimizer.beta2", "optimizer.eps",
      "optimizer.weight_decay", "optimizer.grad_clip", "schedule.decay", "schedule.warmup_steps",
      "schedule.min_lr", "checkpoint.every", "checkpoint.keep_last", "checkpoint.keep_every",
      "precision", "dtypes.param", "dtypes.activation", "dtypes.grad", "dtypes.master",
      "loss_scale.mode", "loss_scale.init_scale", "loss_scale.growth_factor",
      "loss_scale.backoff_factor", "loss_scale.growth_interval", "loss_scale.hysteresis",
      "loss_scale.consecutive_hysteresis", "loss_scale.min_scale", "loss_scale.max_scale",
      "loss_scale.max_consecutive_min_scale_skips", "fp8.format", "fp8.recipe",
      "fp8.amax_history_len", "fp8.amax_compute", "fp8.margin", "fp8.lm_head",
      "fp8.first_last_blocks", "distributed.zero_stage", "backend", "threads", "output.dir", "output.name"};
  std::vector<std::string> paths;
  for (const auto& k : mpt::config_schema()) {
    paths.push_back(k.path);
    EXPECT_FALSE(k.type.empty()) << k.path;
    EXPECT_FALSE(k.default_value.empty()) << k.path;
    EXPECT_FALSE(k.description.empty()) << k.path;
    EXPECT_FALSE(k.allowed.empty()) << k.path;
  }
  EXPECT_EQ(paths, expected);
  // Spot-check the generated text.
  const auto& first = mpt::config_schema().front();
  EXPECT_EQ(first.default_value, "4");
  EXPECT_EQ(first.allowed, ">= 1");
}

TEST(Config, DocsMentionEveryKey) {
  const std::string doc = read_text(std::string(MPT_SOURCE_DIR) + "/docs/config.md");
  ASSERT_FALSE(doc.empty());
  for (const auto& k : mpt::config_schema())
    EXPECT_NE(doc.find("`" + k.path + "`"), std::string::npos) << k.path << " is not documented";
}

// docs/config.md's key table is generated from config_schema(); this keeps it in sync. Run the
// test with MPT_UPDATE_DOCS=1 to rewrite the table after changing the schema.
TEST(Config, DocsKeyTableMatchesSchema) {
  std::string table = "| Key | Type | Default | Allowed | Meaning |\n|---|---|---|---|---|\n";
  for (const auto& k : mpt::config_schema())
    table += "| `" + k.path + "` | " + k.type + " | `" + k.default_value + "` | " + k.allowed +
             " | " + k.description + " |\n";
  const std::string begin = "<!-- BEGIN KEY TABLE (generated from config_schema()) -->\n";
  const std::string end = "<!-- END KEY TABLE -->";
  const std::string path = std::string(MPT_SOURCE_DIR) + "/docs/config.md";
  std::string doc = read_text(path);
  const size_t b = doc.find(begin), e = doc.find(end);
  ASSERT_NE(b, std::string::npos);
  ASSERT_NE(e, std::string::npos);
  const std::string current = doc.substr(b + begin.size(), e - b - begin.size());
  if (current != table && std::getenv("MPT_UPDATE_DOCS")) {
    doc.replace(b + begin.size(), e - b - begin.size(), table);
    std::ofstream(path) << doc;
    return;
  }
  EXPECT_EQ(current, table) << "run with MPT_UPDATE_DOCS=1 to regenerate docs/config.md's table";
}

}  // namespace
