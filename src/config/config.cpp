// Config loading. One table (key_table below) lists every key once; parsing, validation, the
// YAML/JSON dumps and config_schema() (from which docs/config.md's key table is checked) are all
// driven by it, so a key cannot be added to one of them and forgotten in another.
#include "config/config.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <climits>
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <variant>

#include <yaml-cpp/yaml.h>

#include "core/error.h"
#include "core/text.h"
#include "data/dataset.h"
#include "precision/policy.h"

namespace mpt {
namespace {

// ---------------------------------------------------------------------------------------------
// Text helpers

std::string in_quotes(const std::string& s) { return "'" + s + "'"; }

// Shortest text that parses back to exactly `v`, written the way people write numbers: 0.0003,
// 300, 1e-08. std::to_chars guarantees the round trip and, unlike printf, ignores the locale.
std::string format_double(double v) {
  char buf[64];
  // The shortest round-trip form in scientific notation gives the digits needed and the exponent.
  auto res = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);
  const std::string sci(buf, res.ptr);
  const size_t e = sci.find('e');
  const int exponent = std::atoi(sci.c_str() + e + 1);
  const int digits = static_cast<int>(
      std::count_if(sci.begin(), sci.begin() + e, [](char ch) { return std::isdigit(ch); }));
  // %g-style output with that many digits (more for integers like 300, which %.1g would print
  // as 3e+02) picks fixed or scientific notation like printf does.
  const int precision = std::clamp(std::max(digits, exponent + 1), 1, 17);
  res = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::general, precision);
  return std::string(buf, res.ptr);
}

std::string lower(std::string s) {
  for (char& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return s;
}

// Case-insensitive edit distance counting a swap of neighbours as one edit, so the common typos
// "modle" and "N_Layer" are one step from "model" and "n_layer".
size_t edit_distance(const std::string& a_in, const std::string& b_in) {
  const std::string a = lower(a_in), b = lower(b_in);
  std::vector<std::vector<size_t>> d(a.size() + 1, std::vector<size_t>(b.size() + 1));
  for (size_t i = 0; i <= a.size(); ++i) d[i][0] = i;
  for (size_t j = 0; j <= b.size(); ++j) d[0][j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t cost = a[i - 1] == b[j - 1] ? 0 : 1;
      d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost});
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1])
        d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
    }
  }
  return d[a.size()][b.size()];
}

// The candidate `word` was most likely meant to be, or "" when none is close enough to be a
// useful hint. Short words get a tighter limit, else every two-letter typo would match "lr".
std::string closest(const std::string& word, const std::vector<std::string>& candidates) {
  const size_t limit = word.size() <= 3 ? 1 : std::max<size_t>(2, word.size() / 3);
  std::string best;
  size_t best_distance = limit + 1;
  for (const auto& c : candidates) {
    const size_t d = edit_distance(word, c);
    if (d < best_distance) best = c, best_distance = d;
  }
  return best;
}

// ---------------------------------------------------------------------------------------------
// Where values come from, and how problems are reported

// An error location: "FILE:LINE:COL" for the config file, "--set ARG" for an override. An
// override already names its key, so errors about that same key leave the key out.
struct Location {
  std::string text;
  std::string implied_key;
};

// Every problem found, so the user can fix them all in one go instead of one per run.
class Errors {
 public:
  void add(const Location& at, const std::string& key, const std::string& message) {
    std::string line = at.text;
    if (!key.empty() && key != at.implied_key) line += ": " + key;
    lines_.push_back(line + ": " + message);
  }
  bool empty() const { return lines_.empty(); }
  std::string report(const std::string& source) const {
    std::string out = "invalid config " + source + ":";
    for (const auto& line : lines_) out += "\n  " + line;
    return out;
  }

 private:
  std::vector<std::string> lines_;
};

// Turns YAML marks into locations, for the config file or for one --set argument.
struct Source {
  std::string file;
  bool is_override = false;
  std::string override_arg;  // "KEY.PATH=VALUE" as given
  std::string override_key;

  Location at(const YAML::Mark& mark) const {
    if (is_override) return {"--set " + override_arg, override_key};
    if (mark.is_null()) return {file, ""};
    return {file + ":" + std::to_string(mark.line + 1) + ":" + std::to_string(mark.column + 1), ""};
  }
};

// Where a key's current value was set; list keys also keep one location per entry.
struct Origin {
  Location where;
  std::vector<Location> items;
};

// ---------------------------------------------------------------------------------------------
// The key table

// A key's storage inside Config, as a plain function so the (static) table holds no state.
template <class T>
using Ref = T& (*)(Config&);
using Field = std::variant<Ref<int>, Ref<int64_t>, Ref<uint64_t>, Ref<double>, Ref<bool>,
                           Ref<std::string>, Ref<std::vector<std::string>>>;
#define MPT_FIELD(member) [](Config& c) -> auto& { return c.member; }

// Reading through a Ref never writes; the const_cast only lets one accessor serve both uses.
template <class T>
const T& read(Ref<T> ref, const Config& c) {
  return ref(const_cast<Config&>(c));
}

template <class... F>
struct Overloaded : F... {
  using F::operator()...;
};
template <class... F>
Overloaded(F...) -> Overloaded<F...>;

// The allowed interval of a numeric key; either end may be open or absent.
struct Range {
  std::optional<double> lo, hi;
  bool lo_open = false, hi_open = false;

  bool contains(double v) const {
    if (lo && (lo_open ? v <= *lo : v < *lo)) return false;
    if (hi && (hi_open ? v >= *hi : v > *hi)) return false;
    return true;
  }
  std::string describe() const {
    if (lo && hi)
      return std::string("in ") + (lo_open ? "(" : "[") + format_double(*lo) + ", " +
             format_double(*hi) + (hi_open ? ")" : "]");
    if (lo) return (lo_open ? "> " : ">= ") + format_double(*lo);
    if (hi) return (hi_open ? "< " : "<= ") + format_double(*hi);
    return "";
  }
};
Range any_value() { return {}; }
Range at_least(double lo) { return {lo, std::nullopt, false, false}; }
Range above(double lo) { return {lo, std::nullopt, true, false}; }
Range closed(double lo, double hi) { return {lo, hi, false, false}; }
Range half_open(double lo, double hi) { return {lo, hi, false, true}; }
Range open_interval(double lo, double hi) { return {lo, hi, true, true}; }

struct KeyDef;
// A check beyond type/range/choices (file existence, path syntax); adds its own errors.
using ExtraCheck = void (*)(const KeyDef& key, const Config& c, const Origin& origin,
                            Errors& errors);

struct KeyDef {
  std::string path;
  Field field;
  std::string type;
  std::string description;
  Range range;                         // numeric keys
  std::vector<std::string> choices;    // enumeration keys: every name the format knows
  std::vector<std::string> available;  // the subset this version implements (empty: all)
  ExtraCheck extra = nullptr;
  std::string note;  // constraints not expressed above, for the docs' "allowed" column

  KeyDef with_note(std::string n) && {
    note = std::move(n);
    return std::move(*this);
  }
};

KeyDef make_key(std::string path, Field field, std::string type, std::string description) {
  KeyDef k;
  k.path = std::move(path);
  k.field = field;
  k.type = std::move(type);
  k.description = std::move(description);
  return k;
}
KeyDef integer(std::string path, Field field, Range range, std::string description) {
  const char* type = std::holds_alternative<Ref<int>>(field)       ? "integer"
                     : std::holds_alternative<Ref<int64_t>>(field) ? "integer (64-bit)"
                                                                    : "unsigned integer (64-bit)";
  KeyDef k = make_key(std::move(path), field, type, std::move(description));
  k.range = range;
  return k;
}
KeyDef number(std::string path, Ref<double> field, Range range, std::string description) {
  KeyDef k = make_key(std::move(path), field, "number", std::move(description));
  k.range = range;
  return k;
}
KeyDef choice(std::string path, Ref<std::string> field, std::vector<std::string> choices,
              std::vector<std::string> available, std::string description) {
  KeyDef k = make_key(std::move(path), field, "string", std::move(description));
  k.choices = std::move(choices);
  k.available = std::move(available);
  return k;
}
KeyDef boolean(std::string path, Ref<bool> field, std::string description) {
  return make_key(std::move(path), field, "boolean", std::move(description));
}
// A precision key's values come from PrecisionPolicy, which also checks them for configs that
// do not come through the loader.
KeyDef precision_choice(std::string path, Ref<std::string> field, std::string description) {
  const auto& values = PrecisionPolicy::choices(path);
  return choice(std::move(path), field, values, {}, std::move(description));
}
KeyDef text(std::string path, Ref<std::string> field, ExtraCheck extra, std::string note,
            std::string description) {
  KeyDef k = make_key(std::move(path), field, "string", std::move(description));
  k.extra = extra;
  k.note = std::move(note);
  return k;
}
KeyDef path_list(std::string path, Ref<std::vector<std::string>> field, ExtraCheck extra,
                 std::string note, std::string description) {
  KeyDef k = make_key(std::move(path), field, "string or list of strings", std::move(description));
  k.extra = extra;
  k.note = std::move(note);
  return k;
}

void check_data_entries(const KeyDef& key, const Config& c, const Origin& origin,
                        Errors& errors) {
  const auto& entries = read(std::get<Ref<std::vector<std::string>>>(key.field), c);
  if (entries.empty()) {
    errors.add(origin.where, key.path, "empty list; give at least one path, glob or 'builtin'");
    return;
  }
  for (size_t i = 0; i < entries.size(); ++i) {
    const Location& at = i < origin.items.size() ? origin.items[i] : origin.where;
    const std::string& entry = entries[i];
    if (entry == "builtin") continue;
    if (entry.empty()) {
      errors.add(at, key.path, "empty path");
    } else if (data::glob_files(entry).empty()) {
      std::string msg = in_quotes(entry) + " matches no existing file";
      char cwd[4096];
      if (entry[0] != '/' && getcwd(cwd, sizeof cwd))
        msg += std::string(" (relative to the current directory ") + cwd + ")";
      errors.add(at, key.path, msg);
    }
  }
}

void check_not_empty(const KeyDef& key, const Config& c, const Origin& origin, Errors& errors) {
  if (read(std::get<Ref<std::string>>(key.field), c).empty())
    errors.add(origin.where, key.path, "must not be empty");
}

// The run directory's own name: it must not climb out of output.dir or nest below it.
void check_path_component(const KeyDef& key, const Config& c, const Origin& origin,
                          Errors& errors) {
  const std::string& name = read(std::get<Ref<std::string>>(key.field), c);
  if (name == "." || name == ".." || name.find('/') != std::string::npos)
    errors.add(origin.where, key.path,
               "must be a single path component (no '/', not '.' or '..'), got " +
                   in_quotes(name));
  // NAME_MAX on Linux file systems; checked here so that a run that cannot make its directory
  // is refused before anything (output.dir included) is created.
  else if (name.size() > 255)
    errors.add(origin.where, key.path,
               "must be at most 255 bytes (a file name), got " + std::to_string(name.size()));
}

const std::vector<KeyDef>& key_table() {
  static const std::vector<KeyDef> table = [] {
    std::vector<KeyDef> t;
    // model
    t.push_back(integer("model.n_layer", MPT_FIELD(model.n_layer), at_least(1),
                        "number of transformer blocks"));
    t.push_back(integer("model.n_head", MPT_FIELD(model.n_head), at_least(1),
                        "attention heads per block"));
    t.push_back(integer("model.n_embd", MPT_FIELD(model.n_embd), at_least(1),
                        "embedding (residual stream) width")
                    .with_note("multiple of model.n_head; of 16 too under precision fp8"));
    t.push_back(integer("model.vocab_size", MPT_FIELD(model.vocab_size), closed(2, 65536),
                        "real vocabulary size; shards store tokens as uint16, hence at most "
                        "65536"));
    t.push_back(integer("model.vocab_pad_multiple", MPT_FIELD(model.vocab_pad_multiple),
                        closed(1, 65536),
                        "embedding rows are padded up to a multiple of this; padded ids are never "
                        "predicted")
                    .with_note("the padded size a multiple of 16 under fp8.lm_head: fp8"));
    t.push_back(integer("model.max_seq_len", MPT_FIELD(model.max_seq_len), at_least(1),
                        "positions in the learned position embedding"));
    t.push_back(integer("model.init_seed", MPT_FIELD(model.init_seed), any_value(),
                        "seed of the weight initialisation"));
    t.push_back(number("model.init_std", MPT_FIELD(model.init_std), above(0),
                       "standard deviation of the normal weight initialisation"));
    // data
    const char* data_note = "non-empty; each entry 'builtin' or a path/glob matching a file";
    t.push_back(path_list("data.train", MPT_FIELD(data.train), check_data_entries, data_note,
                          "training token shards (paths or globs), or 'builtin' for the built-in "
                          "corpus's train split"));
    t.push_back(path_list("data.val", MPT_FIELD(data.val), check_data_entries, data_note,
                          "validation token shards (paths or globs), or 'builtin' for the "
                          "built-in corpus's validation split"));
    // training
    t.push_back(integer("training.micro_batch", MPT_FIELD(training.micro_batch), at_least(1),
                        "sequences per micro-batch (B)")
                    .with_note("under precision fp8, micro_batch x seq_len a multiple of 16"));
    t.push_back(integer("training.seq_len", MPT_FIELD(training.seq_len), at_least(1),
                        "tokens per sequence (T)")
                    .with_note("<= model.max_seq_len"));
    t.push_back(integer("training.grad_accum", MPT_FIELD(training.grad_accum), at_least(1),
                        "micro-batches accumulated into each optimizer step"));
    t.push_back(integer("training.global_batch_tokens", MPT_FIELD(training.global_batch_tokens),
                        at_least(0),
                        "tokens per optimizer step over all processes; 0 = micro_batch x "
                        "seq_len x grad_accum x processes; when set, grad_accum is derived from "
                        "it")
                    .with_note("a multiple of micro_batch x seq_len (x processes, checked at "
                               "start-up); grad_accum left at 1 when set"));
    t.push_back(integer("training.steps", MPT_FIELD(training.steps), at_least(1),
                        "optimizer steps to run"));
    t.push_back(integer("training.eval_every", MPT_FIELD(training.eval_every), at_least(0),
                        "steps between validation passes; 0 = only at the start and the end"));
    t.push_back(integer("training.eval_batches", MPT_FIELD(training.eval_batches), at_least(1),
                        "micro-batches per validation pass"));
    t.push_back(integer("training.log_every", MPT_FIELD(training.log_every), at_least(1),
                        "steps between step records"));
    t.push_back(integer("training.seed", MPT_FIELD(training.seed), any_value(),
                        "seed of the data order"));
    t.push_back(choice("training.recompute", MPT_FIELD(training.recompute),
                       {"none", "gelu", "gelu+layernorm"}, {},
                       "activations the backward computes again instead of keeping them from "
                       "the forward: the MLP's GELU output (4 x n_embd a token and block), and "
                       "with gelu+layernorm also the two LayerNorm outputs (2 x n_embd); less "
                       "activation memory (the recomputing blocks share one buffer of each, so "
                       "all but one block's worth) for one more pass, the same results (blocks in "
                       "fp8 keep neither anyway; on a GPU under tf32 the same up to rounding, as "
                       "the MLP's first GEMM then runs without cuBLASLt's GELU epilogue)"));
    // optimizer
    t.push_back(number("optimizer.lr", MPT_FIELD(optimizer.lr), above(0),
                       "peak learning rate (AdamW)"));
    t.push_back(number("optimizer.beta1", MPT_FIELD(optimizer.beta1), half_open(0, 1),
                       "AdamW decay rate of the first moment"));
    t.push_back(number("optimizer.beta2", MPT_FIELD(optimizer.beta2), half_open(0, 1),
                       "AdamW decay rate of the second moment"));
    t.push_back(number("optimizer.eps", MPT_FIELD(optimizer.eps), above(0),
                       "AdamW epsilon added to the denominator"));
    t.push_back(number("optimizer.weight_decay", MPT_FIELD(optimizer.weight_decay), at_least(0),
                       "AdamW decoupled weight decay"));
    t.push_back(number("optimizer.grad_clip", MPT_FIELD(optimizer.grad_clip), at_least(0),
                       "clip the global gradient norm to this; 0 disables clipping"));
    // schedule
    t.push_back(choice("schedule.decay", MPT_FIELD(schedule.decay),
                       {"cosine", "linear", "constant"}, {},
                       "learning-rate decay after warmup, from optimizer.lr to schedule.min_lr"));
    t.push_back(integer("schedule.warmup_steps", MPT_FIELD(schedule.warmup_steps), at_least(0),
                        "steps of linear learning-rate warmup at the start"));
    t.push_back(number("schedule.min_lr", MPT_FIELD(schedule.min_lr), at_least(0),
                       "learning rate at the end of the decay")
                    .with_note("<= optimizer.lr"));
    // checkpoint
    t.push_back(integer("checkpoint.every", MPT_FIELD(checkpoint.every), at_least(0),
                        "steps between checkpoints; 0 = only at the end of the run and when "
                        "stopped by a signal"));
    t.push_back(integer("checkpoint.keep_last", MPT_FIELD(checkpoint.keep_last), at_least(1),
                        "how many of the newest checkpoints to keep"));
    t.push_back(integer("checkpoint.keep_every", MPT_FIELD(checkpoint.keep_every), at_least(0),
                        "also keep, permanently, every checkpoint whose step is a multiple of "
                        "this; 0 = none"));
    // top-level keys
    t.push_back(precision_choice("precision", MPT_FIELD(precision),
                                 "numeric precision preset of the training step "
                                 "(docs/precision.md); the dtypes, loss_scale and fp8 sections "
                                 "override parts of it"));
    // dtypes: per-role overrides of the preset
    t.push_back(precision_choice("dtypes.param", MPT_FIELD(dtypes.param),
                                 "weights as the ops read them; preset = the preset's (fp16 for "
                                 "fp16, bf16 for bf16, bf16-pure and fp8, else fp32)"));
    t.push_back(precision_choice("dtypes.activation", MPT_FIELD(dtypes.activation),
                                 "activations, the tensors between ops and their gradients; "
                                 "preset = the preset's (as dtypes.param)"));
    t.push_back(precision_choice("dtypes.grad", MPT_FIELD(dtypes.grad),
                                 "parameter gradients and their accumulation; preset = the "
                                 "preset's (bf16 for bf16-pure, else fp32)"));
    t.push_back(precision_choice("dtypes.master", MPT_FIELD(dtypes.master),
                                 "an fp32 master copy of the weights that the optimizer updates; "
                                 "preset = the preset's (fp32 for fp16, bf16 and fp8) when the "
                                 "weights are 16-bit, else none")
                    .with_note("fp32 only with 16-bit weights"));
    // loss_scale: LossScalerConfig (docs/precision.md, "Loss scaling")
    t.push_back(precision_choice("loss_scale.mode", MPT_FIELD(loss_scale.mode),
                                 "fp16 loss scaling; preset = the preset's (dynamic for fp16, "
                                 "else none); static keeps the scale at init_scale"));
    // A value other than the default where the key has no effect is an error (validate()).
    const std::string dynamic_note = "non-default only with mode dynamic";
    t.push_back(number("loss_scale.init_scale", MPT_FIELD(loss_scale.init_scale), above(0),
                       "the first scale (dynamic) or the fixed one (static)")
                    .with_note("within [min_scale, max_scale] when dynamic; non-default only "
                               "with mode dynamic or static"));
    t.push_back(number("loss_scale.growth_factor", MPT_FIELD(loss_scale.growth_factor), above(1),
                       "dynamic: the scale is multiplied by this after growth_interval finite "
                       "steps in a row")
                    .with_note(dynamic_note));
    t.push_back(number("loss_scale.backoff_factor", MPT_FIELD(loss_scale.backoff_factor),
                       open_interval(0, 1),
                       "dynamic: the scale is multiplied by this when an overflow backs it off")
                    .with_note(dynamic_note));
    t.push_back(integer("loss_scale.growth_interval", MPT_FIELD(loss_scale.growth_interval),
                        at_least(1), "dynamic: finite steps in a row before the scale grows")
                    .with_note(dynamic_note));
    t.push_back(integer("loss_scale.hysteresis", MPT_FIELD(loss_scale.hysteresis), at_least(1),
                        "dynamic: overflows tolerated before the scale backs off; 1 = back off "
                        "at every overflow, as GradScaler does")
                    .with_note(dynamic_note));
    t.push_back(boolean("loss_scale.consecutive_hysteresis",
                        MPT_FIELD(loss_scale.consecutive_hysteresis),
                        "dynamic: true = every finite step restores the hysteresis budget "
                        "(DeepSpeed), false = only a growth does (Megatron-LM)")
                    .with_note(dynamic_note));
    t.push_back(number("loss_scale.min_scale", MPT_FIELD(loss_scale.min_scale), above(0),
                       "dynamic: the scale never backs off below this")
                    .with_note("<= loss_scale.max_scale; " + dynamic_note));
    t.push_back(number("loss_scale.max_scale", MPT_FIELD(loss_scale.max_scale), above(0),
                       "dynamic: the scale never grows above this")
                    .with_note(">= loss_scale.min_scale; " + dynamic_note));
    t.push_back(integer("loss_scale.max_consecutive_min_scale_skips",
                        MPT_FIELD(loss_scale.max_consecutive_min_scale_skips), at_least(1),
                        "overflow steps in a row at min_scale (static and none: any overflow "
                        "steps in a row) before the run stops with a diagnostic"));
    // fp8: Fp8Recipe (docs/precision.md, "fp8 scaling")
    const std::string fp8_note = "non-default only with precision fp8";
    const std::string delayed_note = fp8_note + " and recipe delayed";
    t.push_back(precision_choice("fp8.format", MPT_FIELD(fp8.format),
                                 "hybrid: e4m3 forward and e5m2 for gradients; e4m3: e4m3 for "
                                 "both")
                    .with_note(fp8_note));
    t.push_back(precision_choice("fp8.recipe", MPT_FIELD(fp8.scaling.recipe),
                                 "delayed: each tensor's scale from the amaxes of earlier steps; "
                                 "current: from the step's own amax")
                    .with_note(fp8_note));
    t.push_back(integer("fp8.amax_history_len", MPT_FIELD(fp8.scaling.amax_history_len),
                        closed(1, 65536), "delayed: steps of amax history kept per tensor")
                    .with_note(delayed_note));
    t.push_back(precision_choice("fp8.amax_compute", MPT_FIELD(fp8.scaling.amax_compute),
                                 "delayed: the history's largest amax, or its most recent one")
                    .with_note(delayed_note));
    t.push_back(integer("fp8.margin", MPT_FIELD(fp8.scaling.margin), closed(0, 16),
                        "the scale is divided by 2^margin (headroom for growing amaxes)")
                    .with_note(fp8_note));
    t.push_back(precision_choice("fp8.lm_head", MPT_FIELD(fp8.lm_head),
                                 "the tied LM head's GEMM: bf16 (not fp8: the policy's 16-bit "
                                 "matmul), or fp8 (usually hurts quality; gives a warning)")
                    .with_note(fp8_note));
    t.push_back(precision_choice("fp8.first_last_blocks", MPT_FIELD(fp8.first_last_blocks),
                                 "the first and last blocks' GEMMs: fp8 like the others, or bf16 "
                                 "(not fp8) for stability")
                    .with_note(fp8_note));
    t.push_back(integer("distributed.zero_stage", MPT_FIELD(distributed.zero_stage), closed(0, 1),
                        "0 = every process keeps the whole optimizer state; 1 = ZeRO-1: each of "
                        "N processes keeps and updates 1/N of the master weights and AdamW "
                        "moments, then gathers the updated weights"));
    t.push_back(choice("backend", MPT_FIELD(backend), {"cpu", "cuda", "auto"}, {},
                       "compute backend; auto picks cuda when a usable GPU is present, else cpu"));
    t.push_back(integer("threads", MPT_FIELD(threads), closed(0, 1024),
                        "CPU threads; 0 = all available cores"));
    // output
    t.push_back(text("output.dir", MPT_FIELD(output.dir), check_not_empty, "non-empty path",
                     "directory in which run directories are created"));
    t.push_back(text("output.name", MPT_FIELD(output.name), check_path_component,
                     "a single path component (no '/', not '.' or '..'), or empty",
                     "run directory name under output.dir; empty = the config file's stem, '-' "
                     "and a UTC timestamp"));
    return t;
  }();
  return table;
}

#undef MPT_FIELD

// Constraints between two keys, reported at `key` (or at `other` when only that one was set).
struct CrossCheck {
  const char* key;
  const char* other;
  std::string (*problem)(const Config& c);  // "" when satisfied
};

const std::vector<CrossCheck>& cross_checks() {
  static const std::vector<CrossCheck> checks = {
      {"model.n_embd", "model.n_head",
       [](const Config& c) -> std::string {
         if (c.model.n_embd % c.model.n_head == 0) return "";
         return std::to_string(c.model.n_embd) + " is not divisible by model.n_head (" +
                std::to_string(c.model.n_head) + ")";
       }},
      {"training.seq_len", "model.max_seq_len",
       [](const Config& c) -> std::string {
         if (c.training.seq_len <= c.model.max_seq_len) return "";
         return std::to_string(c.training.seq_len) + " exceeds model.max_seq_len (" +
                std::to_string(c.model.max_seq_len) + ")";
       }},
      {"training.global_batch_tokens", "training.micro_batch",
       [](const Config& c) -> std::string {
         const int64_t g = c.training.global_batch_tokens;
         if (g == 0) return "";
         const int64_t per = static_cast<int64_t>(c.training.micro_batch) * c.training.seq_len;
         if (g % per != 0)
           return std::to_string(g) + " is not a multiple of training.micro_batch x "
                  "training.seq_len (" + std::to_string(per) + " tokens per micro-batch)";
         if (c.training.grad_accum != 1)
           return std::to_string(g) + " is set, so training.grad_accum is derived from it and "
                  "must be left at 1 (it is " + std::to_string(c.training.grad_accum) + ")";
         return "";
       }},
      // fp8 GEMMs on Tensor Cores take operands whose every dimension is a multiple of 16
      // (cuBLASLt's FP8 requirements: 16-byte-aligned rows of 1-byte elements): the widths
      // (n_embd, 3 and 4 times it), the tokens of a micro-batch (the weight gradients' inner
      // dimension) and, with an fp8 LM head, the padded vocabulary. Checked on every backend,
      // so that a config tried on the CPU's emulation also runs on a GPU.
      {"model.n_embd", "precision",
       [](const Config& c) -> std::string {
         if (c.precision != "fp8" || c.model.n_embd % 16 == 0) return "";
         return std::to_string(c.model.n_embd) + " is not a multiple of 16, which precision fp8 "
                "needs (fp8 Tensor Core GEMMs take dimensions in multiples of 16)";
       }},
      {"training.micro_batch", "training.seq_len",
       [](const Config& c) -> std::string {
         const int64_t n = static_cast<int64_t>(c.training.micro_batch) * c.training.seq_len;
         if (c.precision != "fp8" || n % 16 == 0) return "";
         return "training.micro_batch x training.seq_len (" +
                std::to_string(c.training.micro_batch) + " x " +
                std::to_string(c.training.seq_len) + " = " + std::to_string(n) +
                " tokens) is not a multiple of 16, which precision fp8 needs (its weight-gradient "
                "GEMMs sum over a micro-batch's tokens, and fp8 Tensor Core GEMMs take dimensions "
                "in multiples of 16)";
       }},
      {"model.vocab_pad_multiple", "fp8.lm_head",
       [](const Config& c) -> std::string {
         const int64_t m = c.model.vocab_pad_multiple;
         const int64_t padded = (c.model.vocab_size + m - 1) / m * m;
         if (c.precision != "fp8" || c.fp8.lm_head != "fp8" || padded % 16 == 0) return "";
         return std::to_string(m) + " pads the vocabulary to " + std::to_string(padded) +
                ", not a multiple of 16, which fp8.lm_head: fp8 needs (fp8 Tensor Core GEMMs "
                "take dimensions in multiples of 16); use a multiple of 16 such as 64";
       }},
      {"schedule.min_lr", "optimizer.lr",
       [](const Config& c) -> std::string {
         if (c.schedule.min_lr <= c.optimizer.lr) return "";
         return format_double(c.schedule.min_lr) + " is greater than optimizer.lr (" +
                format_double(c.optimizer.lr) + ")";
       }},
  };
  return checks;
}

const KeyDef* find_key(const std::string& path) {
  for (const auto& k : key_table())
    if (k.path == path) return &k;
  return nullptr;
}

std::string child_path(const std::string& parent, const std::string& name) {
  return parent.empty() ? name : parent + "." + name;
}

// The names one level below `parent` ("" = the top level), in table order.
std::vector<std::string> children_of(const std::string& parent) {
  const std::string prefix = parent.empty() ? "" : parent + ".";
  std::vector<std::string> names;
  for (const auto& k : key_table()) {
    if (k.path.compare(0, prefix.size(), prefix) != 0 || k.path.size() == prefix.size()) continue;
    std::string rest = k.path.substr(prefix.size());
    std::string name = rest.substr(0, rest.find('.'));
    if (std::find(names.begin(), names.end(), name) == names.end()) names.push_back(name);
  }
  return names;
}

bool is_section(const std::string& path) {
  return !path.empty() && !children_of(path).empty();
}

std::string unknown_key_message(const std::string& parent, const std::string& name,
                                bool full_paths) {
  const std::vector<std::string> siblings = children_of(parent);
  const std::string near = closest(name, siblings);
  if (!near.empty())
    return "unknown key (did you mean " + in_quotes(full_paths ? child_path(parent, near) : near) +
           "?)";
  // The right name in the wrong place ("model.lr", or "lr" at the top): say where it lives.
  for (const auto& k : key_table()) {
    const std::string leaf = k.path.substr(k.path.rfind('.') + 1);
    if (lower(leaf) == lower(name)) return "unknown key (did you mean " + in_quotes(k.path) + "?)";
  }
  // Below a key that holds a value ("model.n_layer.x"): it has no keys at all.
  if (siblings.empty() && !parent.empty())
    return "unknown key (" + in_quotes(parent) + " is a value, not a section)";
  return "unknown key (known here: " + join(siblings, ", ") + ")";
}

// ---------------------------------------------------------------------------------------------
// Reading values

// YAML's explicit string tag, as yaml-cpp resolves `!!str`.
const char* const kYamlStrTag = "tag:yaml.org,2002:str";

// What a node holds, in words, for "expected X, got Y".
std::string describe(const YAML::Node& n) {
  if (n.IsNull()) return "nothing (null)";
  if (n.IsSequence()) return "a list";
  if (n.IsMap()) return "a map";
  if (n.Tag() == "!") return "the quoted string " + in_quotes(n.Scalar());
  if (n.Tag() == kYamlStrTag) return "the string (!!str) " + in_quotes(n.Scalar());
  return in_quotes(n.Scalar());
}

// A plain (unquoted, untagged as a string) scalar: numbers written in quotes or tagged !!str are
// strings, not numbers.
bool is_plain_scalar(const YAML::Node& n) {
  return n.IsScalar() && n.Tag() != "!" && n.Tag() != kYamlStrTag;
}

// Decimal integers only: YAML 1.1 spellings like 0x1F or 1_000 are rejected, not guessed at.
std::optional<int64_t> read_integer(const YAML::Node& n, int64_t min, int64_t max,
                                    std::string& why) {
  if (is_plain_scalar(n)) {
    std::string s = n.Scalar();
    if (!s.empty() && s[0] == '+') s.erase(0, 1);
    int64_t v = 0;
    auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (ec == std::errc() && end == s.data() + s.size() && !s.empty()) {
      if (v >= min && v <= max) return v;
      why = in_quotes(n.Scalar()) + " does not fit in a " + (max == INT_MAX ? "32" : "64") +
            "-bit integer";
      return std::nullopt;
    }
    if (ec == std::errc::result_out_of_range) {
      why = in_quotes(n.Scalar()) + " does not fit in a 64-bit integer";
      return std::nullopt;
    }
  }
  why = "expected an integer, got " + describe(n);
  return std::nullopt;
}

std::optional<uint64_t> read_unsigned(const YAML::Node& n, std::string& why) {
  if (is_plain_scalar(n)) {
    std::string s = n.Scalar();
    if (!s.empty() && s[0] == '+') s.erase(0, 1);
    uint64_t v = 0;
    auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (ec == std::errc() && end == s.data() + s.size() && !s.empty()) return v;
    if (ec == std::errc::result_out_of_range) {
      why = in_quotes(n.Scalar()) + " does not fit in an unsigned 64-bit integer";
      return std::nullopt;
    }
  }
  why = "expected a non-negative integer, got " + describe(n);
  return std::nullopt;
}

std::optional<double> read_number(const YAML::Node& n, std::string& why) {
  if (is_plain_scalar(n)) {
    std::string s = n.Scalar();
    const std::string l = lower(s);
    // YAML's own spellings of infinity and NaN; caught here so the message says why.
    if (l == ".nan" || l == ".inf" || l == "+.inf" || l == "-.inf") {
      why = "must be a finite number, got " + in_quotes(s);
      return std::nullopt;
    }
    if (!s.empty() && s[0] == '+') s.erase(0, 1);
    double v = 0;
    auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (end == s.data() + s.size() && !s.empty()) {
      if (ec == std::errc() && std::isfinite(v)) return v;
      if (ec == std::errc::result_out_of_range || !std::isfinite(v)) {
        // from_chars says out of range for both ends; strtod's result tells them apart.
        const bool tiny = ec == std::errc::result_out_of_range &&
                          std::fabs(std::strtod(s.c_str(), nullptr)) < 1.0;
        why = tiny ? in_quotes(n.Scalar()) + " is too small for a double (it would become 0); "
                                             "write 0, or a magnitude of at least 2.3e-308"
                   : "must be a finite number, got " + in_quotes(n.Scalar());
        return std::nullopt;
      }
    }
  }
  why = "expected a number, got " + describe(n);
  return std::nullopt;
}

// YAML 1.2's spellings of true and false only: YAML 1.1's yes/no/on/off (which yaml-cpp would
// accept) are too easily meant as strings, and 1/0 as numbers.
std::optional<bool> read_bool(const YAML::Node& n, std::string& why) {
  if (is_plain_scalar(n)) {
    const std::string& s = n.Scalar();
    if (s == "true" || s == "True" || s == "TRUE") return true;
    if (s == "false" || s == "False" || s == "FALSE") return false;
  }
  why = "expected true or false, got " + describe(n);
  return std::nullopt;
}

std::optional<std::string> read_string(const YAML::Node& n, std::string& why) {
  if (n.IsScalar()) return n.Scalar();
  why = "expected a string, got " + describe(n);
  return std::nullopt;
}

// Everything gathered while loading: the config so far and what is known about each key.
struct LoadState {
  Config config;
  std::map<std::string, Origin> origins;  // keys the user set, and where
  std::set<std::string> unreadable;       // keys whose value had the wrong type: skip checks
  Errors errors;
};

// A single string or a list of strings; each entry remembers its own location.
bool read_string_list(const KeyDef& key, const YAML::Node& n, const Source& src,
                      const Location& at, LoadState& st, Origin& origin,
                      std::vector<std::string>& out) {
  if (n.IsScalar()) {
    out = {n.Scalar()};
    origin.items = {at};
    return true;
  }
  if (!n.IsSequence()) {
    st.errors.add(at, key.path, "expected a string or a list of strings, got " + describe(n));
    return false;
  }
  bool ok = true;
  for (size_t i = 0; i < n.size(); ++i) {
    const YAML::Node item = n[i];
    const Location item_at = src.at(item.Mark());
    if (!item.IsScalar()) {
      st.errors.add(item_at, key.path + "[" + std::to_string(i) + "]",
                    "expected a string, got " + describe(item));
      ok = false;
      continue;
    }
    out.push_back(item.Scalar());
    origin.items.push_back(item_at);
  }
  return ok;
}

void read_leaf(const KeyDef& key, const YAML::Node& n, const Source& src, const Location& at,
               LoadState& st) {
  std::string why;  // set when the value has the wrong type
  Origin origin{at, {}};
  Config& c = st.config;
  const bool ok = std::visit(
      Overloaded{
          [&](Ref<int> ref) {
            auto v = read_integer(n, INT_MIN, INT_MAX, why);
            if (v) ref(c) = static_cast<int>(*v);
            return v.has_value();
          },
          [&](Ref<int64_t> ref) {
            auto v = read_integer(n, INT64_MIN, INT64_MAX, why);
            if (v) ref(c) = *v;
            return v.has_value();
          },
          [&](Ref<uint64_t> ref) {
            auto v = read_unsigned(n, why);
            if (v) ref(c) = *v;
            return v.has_value();
          },
          [&](Ref<double> ref) {
            auto v = read_number(n, why);
            if (v) ref(c) = *v;
            return v.has_value();
          },
          [&](Ref<bool> ref) {
            auto v = read_bool(n, why);
            if (v) ref(c) = *v;
            return v.has_value();
          },
          [&](Ref<std::string> ref) {
            auto v = read_string(n, why);
            if (v) ref(c) = *v;
            return v.has_value();
          },
          [&](Ref<std::vector<std::string>> ref) {
            std::vector<std::string> list;
            if (!read_string_list(key, n, src, at, st, origin, list)) return false;
            ref(c) = std::move(list);
            return true;
          },
      },
      key.field);
  if (!ok) {
    if (!why.empty()) st.errors.add(at, key.path, why);
    st.unreadable.insert(key.path);
    return;
  }
  // A later, valid value (an override fixing the file) is checked like any other.
  st.unreadable.erase(key.path);
  st.origins[key.path] = std::move(origin);
}

// Applies `n` at `path`: a key's value, or a map of keys for a section or the top level.
// `key_mark` locates errors about a null value, whose own mark yaml-cpp places on the next line.
void apply_node(const std::string& path, const YAML::Node& n, const YAML::Mark& key_mark,
                const Source& src, LoadState& st) {
  const Location at = src.at(n.IsNull() || n.Mark().is_null() ? key_mark : n.Mark());
  if (const KeyDef* key = find_key(path)) {
    read_leaf(*key, n, src, at, st);
    return;
  }
  if (n.IsNull()) return;  // an empty section (or file) keeps every default
  if (!n.IsMap()) {
    st.errors.add(at, path,
                  (path.empty() ? "the top level must be a map of sections and keys, got "
                                : "expected a map of keys, got ") +
                      describe(n));
    return;
  }
  std::map<std::string, std::string> seen;  // key name -> where it first appeared
  for (const auto& kv : n) {
    const YAML::Node& name_node = kv.first;
    const Location name_at = src.at(name_node.Mark());
    if (!name_node.IsScalar()) {
      st.errors.add(name_at, path, "keys must be names, got " + describe(name_node));
      continue;
    }
    const std::string name = name_node.Scalar();
    const std::string child = child_path(path, name);
    if (!find_key(child) && !is_section(child)) {
      st.errors.add(name_at, child, unknown_key_message(path, name, src.is_override));
      continue;
    }
    if (auto [it, fresh] = seen.emplace(name, name_at.text); !fresh) {
      st.errors.add(name_at, child, "duplicate key (first given at " + it->second + ")");
      continue;
    }
    apply_node(child, kv.second, name_node.Mark(), src, st);
  }
}

std::string trim(const std::string& s) {
  const size_t b = s.find_first_not_of(" \t");
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(" \t") - b + 1);
}

void apply_override(const std::string& arg, LoadState& st) {
  Source src;
  src.is_override = true;
  src.override_arg = arg;
  const size_t eq = arg.find('=');
  const std::string path = eq == std::string::npos ? "" : trim(arg.substr(0, eq));
  if (path.empty()) {
    st.errors.add(src.at(YAML::Mark()), "", "expected KEY.PATH=VALUE");
    return;
  }
  src.override_key = path;
  // Walk the path so that an unknown part is reported at its own level, with a suggestion.
  std::string parent;
  for (size_t start = 0;;) {
    const size_t dot = path.find('.', start);
    const std::string name = path.substr(start, dot == std::string::npos ? dot : dot - start);
    const std::string here = child_path(parent, name);
    if (!find_key(here) && !is_section(here)) {
      st.errors.add(src.at(YAML::Mark()), path, unknown_key_message(parent, name, true));
      return;
    }
    if (dot == std::string::npos) break;
    parent = here;
    start = dot + 1;
  }
  const std::string text = trim(arg.substr(eq + 1));
  YAML::Node value;
  if (text.empty()) {
    value = YAML::Node(std::string());  // `--set output.name=` means the empty string
  } else {
    try {
      value = YAML::Load(text);
    } catch (const YAML::ParserException& e) {
      st.errors.add(src.at(YAML::Mark()), path, "invalid YAML value: " + e.msg);
      return;
    }
  }
  apply_node(path, value, YAML::Mark(), src, st);
}

// Reads the config file into `st`; false when it cannot be read or parsed at all.
bool apply_file(const std::string& path, LoadState& st) {
  const Location file_at{path, ""};
  struct stat info {};
  if (stat(path.c_str(), &info) != 0) {
    st.errors.add(file_at, "", std::string("cannot open: ") + std::strerror(errno));
    return false;
  }
  if (S_ISDIR(info.st_mode)) {
    st.errors.add(file_at, "", "is a directory, not a config file");
    return false;
  }
  std::ifstream in(path, std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  if (!in.is_open() || in.bad()) {
    st.errors.add(file_at, "", "cannot read the file");
    return false;
  }
  Source src;
  src.file = path;
  std::vector<YAML::Node> docs;
  try {
    docs = YAML::LoadAll(text.str());
  } catch (const YAML::ParserException& e) {
    st.errors.add(src.at(e.mark), "", "invalid YAML: " + e.msg);
    return false;
  }
  if (docs.size() > 1) {
    st.errors.add(file_at, "", "holds " + std::to_string(docs.size()) +
                                   " YAML documents; a config is exactly one");
    return false;
  }
  if (!docs.empty()) apply_node("", docs[0], YAML::Mark(), src, st);
  return true;
}

// ---------------------------------------------------------------------------------------------
// Validation of the final values

double numeric_value(const KeyDef& key, const Config& c) {
  return std::visit(Overloaded{
                        [&](Ref<int> r) { return double(read(r, c)); },
                        [&](Ref<int64_t> r) { return double(read(r, c)); },
                        [&](Ref<uint64_t> r) { return double(read(r, c)); },
                        [&](Ref<double> r) { return read(r, c); },
                        [&](auto) { return 0.0; },
                    },
                    key.field);
}

// The value as it would be written in the config (lists in flow style, "" for empty strings).
std::string value_text(const KeyDef& key, const Config& c) {
  return std::visit(Overloaded{
                        [&](Ref<int> r) { return std::to_string(read(r, c)); },
                        [&](Ref<int64_t> r) { return std::to_string(read(r, c)); },
                        [&](Ref<uint64_t> r) { return std::to_string(read(r, c)); },
                        [&](Ref<double> r) { return format_double(read(r, c)); },
                        [&](Ref<bool> r) { return std::string(read(r, c) ? "true" : "false"); },
                        [&](Ref<std::string> r) {
                          const std::string& s = read(r, c);
                          return s.empty() ? std::string("\"\"") : s;
                        },
                        [&](Ref<std::vector<std::string>> r) {
                          return "[" + join(read(r, c), ", ") + "]";
                        },
                    },
                    key.field);
}

void validate(LoadState& st) {
  const Config& c = st.config;
  const Origin default_origin{{"(default)", ""}, {}};
  auto origin_of = [&](const std::string& path) -> const Origin& {
    auto it = st.origins.find(path);
    return it == st.origins.end() ? default_origin : it->second;
  };
  std::set<std::string> failed = st.unreadable;  // cross checks skip keys already reported
  for (const auto& key : key_table()) {
    if (st.unreadable.count(key.path)) continue;
    const Origin& origin = origin_of(key.path);
    bool ok = true;
    if (key.range.lo || key.range.hi) {
      if (!key.range.contains(numeric_value(key, c))) {
        st.errors.add(origin.where, key.path,
                      "must be " + key.range.describe() + ", got " + value_text(key, c));
        ok = false;
      }
    }
    if (!key.choices.empty()) {
      const std::string& v = read(std::get<Ref<std::string>>(key.field), c);
      const auto& avail = key.available.empty() ? key.choices : key.available;
      if (std::find(key.choices.begin(), key.choices.end(), v) == key.choices.end()) {
        const std::string near = closest(v, key.choices);
        st.errors.add(origin.where, key.path,
                      "unknown value " + in_quotes(v) +
                          (near.empty() ? " (" : " (did you mean " + in_quotes(near) + "? ") +
                          "choices: " + join(key.choices, ", ") + ")");
        ok = false;
      } else if (std::find(avail.begin(), avail.end(), v) == avail.end()) {
        st.errors.add(origin.where, key.path,
                      key.path + " " + in_quotes(v) +
                          " is not yet available in this version (available: " +
                          join(avail, ", ") + ")");
        ok = false;
      }
    }
    // Strings reach JSON records (the start record, state.json), which hold UTF-8 text only:
    // refused here rather than half-way through creating the run.
    auto utf8 = [&](const std::string& v, const std::string& where_in) {
      if (valid_utf8(v)) return true;
      st.errors.add(origin.where, where_in,
                    "is not valid UTF-8 text (mpt's records are JSON, which holds UTF-8 only)");
      return false;
    };
    bool text_ok = true;
    if (const auto* r = std::get_if<Ref<std::string>>(&key.field))
      text_ok = utf8(read(*r, c), key.path);
    if (const auto* r = std::get_if<Ref<std::vector<std::string>>>(&key.field)) {
      const auto& list = read(*r, c);
      for (size_t i = 0; i < list.size(); ++i)
        text_ok = utf8(list[i], key.path + "[" + std::to_string(i) + "]") && text_ok;
    }
    if (text_ok && key.extra) key.extra(key, c, origin, st.errors);
    if (!ok || !text_ok) failed.insert(key.path);
  }
  for (const auto& check : cross_checks()) {
    if (failed.count(check.key) || failed.count(check.other)) continue;
    const std::string problem = check.problem(c);
    if (problem.empty()) continue;
    // Blame the line the user wrote: the key itself if they set it, else the other key.
    const bool key_set = st.origins.count(check.key) > 0;
    const Origin& at = origin_of(key_set || !st.origins.count(check.other) ? check.key
                                                                            : check.other);
    st.errors.add(at.where, check.key, problem);
  }
  // The precision keys together: PrecisionPolicy knows which combinations make sense.
  if (failed.count("precision")) return;
  // A value set for a key the resolved policy ignores is most likely a mistake about the
  // policy (fp8 settings under precision bf16): rejected rather than silently unused. The
  // default value is accepted, so that a config written out in full (configs/default.yaml,
  // config_to_yaml) loads. Such a key's other problems are moot.
  static const Config defaults;
  for (const auto& [key, why] : PrecisionPolicy::inert_keys(c)) {
    if (!st.origins.count(key) || failed.count(key)) continue;
    const KeyDef& def = *find_key(key);
    const std::string value = value_text(def, c);
    if (value == value_text(def, defaults)) continue;
    st.errors.add(origin_of(key).where, key, value + " has no effect: " + why);
    failed.insert(key);
  }
  // Reported at the key when the user set it, else at the preset that implied its value.
  for (const auto& [key, problem] : PrecisionPolicy::problems(c)) {
    if (failed.count(key)) continue;  // reported already: its range, choices, or no effect
    st.errors.add(origin_of(st.origins.count(key) ? key : "precision").where, key, problem);
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Public API


Config load_config(const std::string& path, const std::vector<std::string>& overrides) {
  LoadState st;
  st.config.source_path = path;
  const std::string source = path.empty() ? "(built-in defaults)" : path;
  if (!path.empty() && !apply_file(path, st)) throw InputError(st.errors.report(source));
  for (const auto& arg : overrides) apply_override(arg, st);
  validate(st);
  if (!st.errors.empty()) throw InputError(st.errors.report(source));
  return st.config;
}

std::string config_to_yaml(const Config& c) {
  YAML::Emitter out;
  out << YAML::BeginMap;
  std::string section;  // the section map currently open, "" for none
  for (const auto& key : key_table()) {
    const size_t dot = key.path.find('.');
    const std::string key_section = dot == std::string::npos ? "" : key.path.substr(0, dot);
    if (key_section != section) {
      if (!section.empty()) out << YAML::EndMap;
      if (!key_section.empty()) out << YAML::Key << key_section << YAML::Value << YAML::BeginMap;
      section = key_section;
    }
    out << YAML::Key << key.path.substr(dot == std::string::npos ? 0 : dot + 1) << YAML::Value;
    std::visit(Overloaded{
                   [&](Ref<int> r) { out << read(r, c); },
                   [&](Ref<int64_t> r) { out << read(r, c); },
                   [&](Ref<uint64_t> r) { out << read(r, c); },
                   // As shortest round-trip text: the emitter's own double output either loses
                   // digits or prints 0.1 as 0.10000000000000001.
                   [&](Ref<double> r) { out << format_double(read(r, c)); },
                   [&](Ref<bool> r) { out << YAML::TrueFalseBool << read(r, c); },
                   [&](Ref<std::string> r) { out << read(r, c); },
                   [&](Ref<std::vector<std::string>> r) {
                     out << YAML::Flow << YAML::BeginSeq;
                     for (const auto& s : read(r, c)) out << s;
                     out << YAML::EndSeq;
                   },
               },
               key.field);
  }
  if (!section.empty()) out << YAML::EndMap;
  out << YAML::EndMap;
  return std::string(out.c_str()) + "\n";
}

namespace {
void flatten_into(const nlohmann::json& j, const std::string& prefix,
                  std::map<std::string, nlohmann::json>& out) {
  if (j.is_object()) {
    for (auto it = j.begin(); it != j.end(); ++it)
      flatten_into(it.value(), prefix.empty() ? it.key() : prefix + "." + it.key(), out);
  } else {
    out[prefix] = j;
  }
}
}  // namespace

std::map<std::string, nlohmann::json> flatten_config(const nlohmann::json& j) {
  std::map<std::string, nlohmann::json> out;
  flatten_into(j, "", out);
  return out;
}

nlohmann::json config_to_json(const Config& c) {
  nlohmann::json j = nlohmann::json::object();
  for (const auto& key : key_table()) {
    nlohmann::json::json_pointer ptr("/" + key.path.substr(0, key.path.find('.')));
    if (key.path.find('.') != std::string::npos)
      ptr /= key.path.substr(key.path.find('.') + 1);
    std::visit([&](auto r) { j[ptr] = read(r, c); }, key.field);
  }
  return j;
}

const std::vector<ConfigKeyInfo>& config_schema() {
  static const std::vector<ConfigKeyInfo> schema = [] {
    std::vector<ConfigKeyInfo> out;
    const Config defaults;
    for (const auto& key : key_table()) {
      std::string allowed;
      if (!key.choices.empty()) {
        if (key.available.empty()) {
          allowed = "one of " + join(key.choices, ", ");
        } else {
          std::vector<std::string> later;
          for (const auto& ch : key.choices)
            if (std::find(key.available.begin(), key.available.end(), ch) == key.available.end())
              later.push_back(ch);
          allowed = join(key.available, ", ") + " (not yet available: " + join(later, ", ") + ")";
        }
      } else {
        allowed = key.range.describe();
      }
      // After a list of choices, a comma would read as one more choice.
      if (!key.note.empty())
        allowed += (allowed.empty() ? "" : key.choices.empty() ? ", " : "; ") + key.note;
      if (allowed.empty()) allowed = "any";
      out.push_back({key.path, key.type, value_text(key, defaults), key.description, allowed});
    }
    return out;
  }();
  return schema;
}

}  // namespace mpt
