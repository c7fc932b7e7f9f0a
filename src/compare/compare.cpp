#include "compare/compare.h"

#include "config/config.h"
#include "core/text.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <limits>
#include <cstdarg>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include "core/error.h"

namespace mpt::compare {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// A later record at or before an earlier one's step (a run resumed from an older checkpoint)
// replaces what came after that step.
template <class Point>
void push_point(std::vector<Point>& v, Point p) {
  while (!v.empty() && v.back().step >= p.step) v.pop_back();
  v.push_back(p);
}

double num(const json& r, const char* key, const std::string& where) {
  if (!r.contains(key) || !r[key].is_number())
    throw InputError(where + ": record without a numeric \"" + key + "\"");
  return r[key].get<double>();
}

// A loss: a number, or the forms a non-finite one takes in a record (JSON has none: mpt's
// writer gives the strings "nan", "inf", "-inf", other writers null, "NaN" or "Infinity"), read
// as NaN or ±inf, so that a run that diverged is compared as one rather than refused as
// malformed.
double loss_num(const json& r, const char* key, const std::string& where) {
  if (r.contains(key) && r[key].is_null()) return std::numeric_limits<double>::quiet_NaN();
  if (r.contains(key) && r[key].is_string()) {
    std::string v = r[key].get<std::string>();
    for (auto& ch : v) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    const double inf = std::numeric_limits<double>::infinity();
    if (v == "nan" || v == "-nan") return std::numeric_limits<double>::quiet_NaN();
    if (v == "inf" || v == "+inf" || v == "infinity" || v == "+infinity") return inf;
    if (v == "-inf" || v == "-infinity") return -inf;
  }
  return num(r, key, where);
}

bool starts_with(const std::string& s, const std::string& p) { return s.rfind(p, 0) == 0; }

// Keys that are expected to differ between compared runs.
bool ignorable_key(const std::string& k) {
  return k == "precision" || k == "training.seed" || k == "model.init_seed" ||
         starts_with(k, "output.") || starts_with(k, "checkpoint.");
}
bool forbidding_key(const std::string& k) {
  return (starts_with(k, "model.") && k != "model.init_seed") || starts_with(k, "data.");
}

std::string pct(double v) { return strf("%+.2f%%", v); }

// The measured peak of a run made by `mpt compare --policies`, if it has one.
std::optional<double> read_measured_peak(const std::string& dir) {
  const std::string file = (fs::path(dir) / kPeakMemoryFile).string();
  std::error_code ec;
  if (!fs::exists(file, ec)) return std::nullopt;
  std::ifstream f(file);
  const json j = json::parse(f, nullptr, false);
  if (j.is_discarded() || !j.is_object() || !j.contains("peak_rss_bytes") ||
      !j["peak_rss_bytes"].is_number() || j["peak_rss_bytes"].get<double>() <= 0)
    throw InputError(file + ": not a peak-memory record (a JSON object with a positive "
                            "\"peak_rss_bytes\")");
  return j["peak_rss_bytes"].get<double>();
}

std::string mib(double bytes) { return strf("%.2f", bytes / 1048576.0); }

// A step record's `casts`: per class, the counts behind its fractions.
CastPoint read_casts(const json& casts, int64_t step, const std::string& where) {
  CastPoint p;
  p.step = step;
  for (size_t k = 0; k < kCastClasses.size(); ++k) {
    if (!casts.contains(kCastClasses[k])) continue;
    const json& c = casts[kCastClasses[k]];
    if (!c.is_object()) throw InputError(where + ": casts." + kCastClasses[k] + " is not an object");
    const std::string at = where + " (casts." + kCastClasses[k] + ")";
    CastCount& n = p.by_class[k];
    n.values = num(c, "values", at);
    n.overflow = n.values * num(c, "overflow", at);
    n.underflow = n.values * num(c, "underflow", at);
  }
  return p;
}

void add(CastCount& to, const CastCount& c) {
  to.values += c.values;
  to.overflow += c.overflow;
  to.underflow += c.underflow;
}

// A fraction for the table: "-" when unknown.
std::string fraction(const std::optional<double>& f) { return f ? strf("%.3g", *f) : "-"; }

}  // namespace

RunData read_run(const std::string& dir) {
  RunData d;
  d.dir = dir;
  d.label = fs::path(dir).lexically_normal().filename().string();
  if (d.label.empty() || d.label == ".")
    d.label = fs::path(dir).lexically_normal().parent_path().filename().string();
  if (d.label.empty()) d.label = dir;
  const std::string file = (fs::path(dir) / "metrics.jsonl").string();
  std::error_code ec;
  if (!fs::is_regular_file(file, ec)) throw InputError(file + ": no such metrics file (is " + dir + " a run directory?)");
  std::ifstream f(file);
  if (!f) throw InputError(file + ": cannot be read");
  std::vector<std::pair<int, std::string>> lines;
  std::string line;
  int lineno = 0;
  while (std::getline(f, line)) {
    ++lineno;
    if (line.find_first_not_of(" \t\r") != std::string::npos) lines.emplace_back(lineno, line);
  }
  if (lines.empty()) throw InputError(file + ": empty metrics file (no records)");

  bool have_start = false;
  int64_t tokens_per_step = 0;
  for (size_t i = 0; i < lines.size(); ++i) {
    const std::string where = file + ":" + std::to_string(lines[i].first);
    json r = json::parse(lines[i].second, nullptr, false);
    if (r.is_discarded() || !r.is_object()) {
      // A crash can cut the last line short; anything else is a damaged file.
      if (i + 1 == lines.size() && have_start) break;
      throw InputError(where + ": not a JSON object");
    }
    const std::string ev = r.contains("event") && r["event"].is_string() ? r["event"].get<std::string>() : "";
    if (ev == "start") {
      if (have_start) {
        // A resumed run: the first start record describes it. The resume continues from
        // resume_step: what the records said past that step (a branch given up, as when an
        // older checkpoint is resumed, or records written after the last checkpoint before a
        // crash) and how the run ended before are no longer true.
        if (r.contains("resume_step") && r["resume_step"].is_number()) {
          const int64_t from = r["resume_step"].get<int64_t>();
          auto cut = [from](auto& v) {
            while (!v.empty() && v.back().step > from) v.pop_back();
          };
          cut(d.train);
          cut(d.speed);
          cut(d.casts);
          cut(d.eval);
          d.steps = from;
          d.tokens = from * tokens_per_step;
          d.skipped_total.reset();  // the given-up steps' count; the next step record's holds
        }
        d.status.clear();
        continue;
      }
      have_start = true;
      if (!r.contains("config") || !r["config"].is_object())
        throw InputError(where + ": start record without a config");
      d.config = r["config"];
      const json& p = r.value("precision", json());
      if (p.is_object() && p.contains("name")) d.policy = p["name"].get<std::string>();
      else if (p.is_string()) d.policy = p.get<std::string>();
      else d.policy = d.config.value("precision", std::string("?"));
      {
        const json& t = d.config.value("training", json::object());
        tokens_per_step = r.value("tokens_per_step", t.value("micro_batch", int64_t{0}) *
                                                         t.value("seq_len", int64_t{0}) *
                                                         t.value("grad_accum", int64_t{1}));
      }
      d.training_seed = d.config.value("training", json::object()).value("seed", uint64_t{0});
      d.init_seed = d.config.value("model", json::object()).value("init_seed", uint64_t{0});
      if (r.contains("memory") && r["memory"].is_object() && r["memory"].contains("total"))
        d.memory_bytes = r["memory"]["total"].get<double>();
      continue;
    }
    if (!have_start) throw InputError(where + ": the first record is not a start record");
    if (ev.empty()) {
      const int64_t step = static_cast<int64_t>(num(r, "step", where));
      const int64_t tokens = static_cast<int64_t>(num(r, "tokens", where));
      push_point(d.train, {step, tokens, loss_num(r, "loss", where)});
      if (r.contains("tokens_per_s") && r["tokens_per_s"].is_number())
        push_point(d.speed, {step, tokens, r["tokens_per_s"].get<double>()});
      // Drop the casts of records a resume replaced, even when this record has none.
      while (!d.casts.empty() && d.casts.back().step >= step) d.casts.pop_back();
      if (r.contains("casts") && r["casts"].is_object())
        push_point(d.casts, read_casts(r["casts"], step, where));
      d.skipped_total.reset();
      if (r.contains("skipped_total") && r["skipped_total"].is_number())
        d.skipped_total = r["skipped_total"].get<int64_t>();
      d.steps = step;
      d.tokens = tokens;
    } else if (ev == "eval") {
      const int64_t step = static_cast<int64_t>(num(r, "step", where));
      push_point(d.eval, {step, step * tokens_per_step, loss_num(r, "val_loss", where)});
    } else if (ev == "end") {
      d.status = r.value("status", std::string());
      if (r.contains("step") && r["step"].is_number() && r["step"].get<int64_t>() >= d.steps) {
        d.steps = r["step"].get<int64_t>();
        if (r.contains("tokens") && r["tokens"].is_number()) d.tokens = r["tokens"].get<int64_t>();
      }
    }
  }
  if (!have_start) throw InputError(file + ": no start record");
  if (!d.eval.empty()) {
    d.val_loss = d.eval.back().value;
    d.val_step = d.eval.back().step;
  }
  d.measured_peak_bytes = read_measured_peak(dir);
  if (!d.casts.empty()) {
    d.cast_totals.emplace();
    d.cast_total.emplace();
    for (const auto& p : d.casts)
      for (size_t k = 0; k < kCastClasses.size(); ++k) {
        add((*d.cast_totals)[k], p.by_class[k]);
        add(*d.cast_total, p.by_class[k]);
      }
  }
  const auto idx = steady_state_records(d.speed);
  if (!idx.empty()) {
    double s = 0;
    for (size_t i : idx) s += d.speed[i].value;
    d.tokens_per_s = s / static_cast<double>(idx.size());
    d.steady_records = static_cast<int>(idx.size());
  }
  return d;
}

std::vector<size_t> steady_state_records(const std::vector<CurvePoint>& speed) {
  std::vector<size_t> out;
  if (speed.empty()) return out;
  if (speed.size() == 1) return {0};
  const int64_t last = speed.back().step;
  const int64_t warm = (last + 9) / 10;  // ceil(10% of the steps)
  for (size_t i = 1; i < speed.size(); ++i)
    if (speed[i].step > warm) out.push_back(i);
  if (out.empty())
    for (size_t i = 1; i < speed.size(); ++i) out.push_back(i);
  return out;
}

std::vector<std::string> differing_keys(const std::vector<json>& configs) {
  std::vector<std::map<std::string, json>> flat(configs.size());
  std::set<std::string> keys;
  for (size_t i = 0; i < configs.size(); ++i) {
    flat[i] = flatten_config(configs[i]);
    for (const auto& kv : flat[i]) keys.insert(kv.first);
  }
  std::vector<std::string> out;
  for (const auto& k : keys) {
    const auto first = flat[0].find(k);
    for (size_t i = 1; i < flat.size(); ++i) {
      const auto it = flat[i].find(k);
      const bool same = (first == flat[0].end()) == (it == flat[i].end()) &&
                        (it == flat[i].end() || it->second == first->second);
      if (!same) {
        out.push_back(k);
        break;
      }
    }
  }
  return out;
}

Comparison compare_runs(const std::vector<std::string>& dirs, const std::string& baseline) {
  if (dirs.empty()) throw InputError("compare: no run directories given");
  // The same run twice (under two spellings, or a symlink) would stand in the table as two runs
  // and make --baseline ambiguous.
  for (size_t i = 0; i < dirs.size(); ++i)
    for (size_t j = 0; j < i; ++j) {
      std::error_code ec;
      if (dirs[i] == dirs[j] || fs::equivalent(dirs[i], dirs[j], ec))
        throw InputError("compare: " + dirs[j] + " and " + dirs[i] + " are the same run");
    }
  Comparison c;
  for (const auto& d : dirs) {
    RunResult r;
    r.data = read_run(d);
    c.runs.push_back(std::move(r));
  }
  // Labels: the directory name, or the path as given when two runs share a name.
  std::map<std::string, int> count;
  for (const auto& r : c.runs) ++count[r.data.label];
  for (auto& r : c.runs)
    if (count[r.data.label] > 1) r.data.label = r.data.dir;

  std::vector<json> configs;
  for (const auto& r : c.runs) configs.push_back(r.data.config);
  std::vector<std::string> refuse, warn;
  for (const auto& k : differing_keys(configs)) {
    if (forbidding_key(k)) refuse.push_back(k);
    else if (!ignorable_key(k)) warn.push_back(k);
  }
  if (!refuse.empty())
    throw InputError("compare: the runs differ in model or data config, so their losses are not "
                     "comparable: " + join(refuse, ", "));
  if (!warn.empty())
    c.warnings.push_back("the runs differ in config keys " + join(warn, ", ") +
                         "; the comparison may not be like for like");

  // The baseline.
  if (!baseline.empty()) {
    const fs::path want = fs::weakly_canonical(baseline);
    bool found = false;
    for (size_t i = 0; i < c.runs.size() && !found; ++i)
      if (fs::weakly_canonical(c.runs[i].data.dir) == want) c.baseline = i, found = true;
    if (!found) throw InputError("compare: --baseline " + baseline + " is not one of the runs compared");
  } else {
    c.baseline = 0;
    for (size_t i = 0; i < c.runs.size(); ++i)
      if (c.runs[i].data.policy == "fp32") {
        c.baseline = i;
        break;
      }
  }
  RunResult& base = c.runs[c.baseline];
  base.is_baseline = true;
  const RunData& b = base.data;

  // The noise band: baseline-policy runs with distinct seeds.
  {
    std::set<std::pair<uint64_t, uint64_t>> seen;
    std::vector<double> losses;
    NoiseBand band;
    band.policy = b.policy;
    for (const auto& r : c.runs) {
      if (r.data.policy != b.policy || !r.data.val_loss || !std::isfinite(*r.data.val_loss))
        continue;
      if (!seen.insert({r.data.training_seed, r.data.init_seed}).second) continue;
      losses.push_back(*r.data.val_loss);
      band.runs.push_back(r.data.label);
    }
    if (losses.size() >= 2 && b.val_loss && std::isfinite(*b.val_loss)) {
      const auto [lo, hi] = std::minmax_element(losses.begin(), losses.end());
      band.spread = *hi - *lo;
      band.spread_pct = 100.0 * band.spread / *b.val_loss;
      c.band = band;
    }
  }

  std::map<std::string, int> policy_count;
  for (const auto& r : c.runs) ++policy_count[r.data.policy];
  for (auto& r : c.runs) {
    const RunData& d = r.data;
    // A diverged run (or baseline) has no difference to give: its verdict says why.
    if (d.val_loss && b.val_loss && std::isfinite(*d.val_loss) && std::isfinite(*b.val_loss)) {
      r.val_diff = *d.val_loss - *b.val_loss;
      r.val_diff_pct = 100.0 * *r.val_diff / *b.val_loss;
      if (c.band && !r.is_baseline) {
        r.inside_band = std::fabs(*r.val_diff) <= c.band->spread;
        if (c.band->spread > 0) r.val_diff_bands = *r.val_diff / c.band->spread;
      }
    }
    if (d.tokens_per_s && b.tokens_per_s && *b.tokens_per_s > 0) r.speedup = *d.tokens_per_s / *b.tokens_per_s;
    if (d.memory_bytes > 0 && b.memory_bytes > 0) r.memory_ratio = d.memory_bytes / b.memory_bytes;
    if (d.measured_peak_bytes && b.measured_peak_bytes)
      r.measured_peak_ratio = *d.measured_peak_bytes / *b.measured_peak_bytes;

    std::string who = d.policy;
    if (policy_count[d.policy] > 1) who += " [" + d.label + "]";
    const int64_t skipped = d.skipped_total.value_or(0);
    const std::string skipped_words =
        strf("%lld skipped step%s", (long long)skipped, skipped == 1 ? "" : "s");
    if (r.is_baseline) {
      r.verdict = who + ": the baseline";
      if (d.val_loss)
        r.verdict += std::isfinite(*d.val_loss) ? strf(" (val loss %.4f)", *d.val_loss)
                                                : std::string(" (val loss not finite: diverged)");
      if (c.band) r.verdict += strf("; %s seed noise ±%.2f%% over %zu seeds", c.band->policy.c_str(),
                                    c.band->spread_pct, c.band->runs.size());
      if (skipped > 0) r.verdict += "; " + skipped_words;
      if (d.status != "completed")
        r.verdict += d.status.empty() ? " [run has no end record]" : " [run " + d.status + "]";
      continue;
    }
    std::vector<std::string> parts;
    parts.push_back(r.speedup ? strf("%.2fx speed", *r.speedup) : "speed unknown");
    parts.push_back(r.memory_ratio ? strf("%.2fx memory", *r.memory_ratio) : "memory unknown");
    if (r.measured_peak_ratio) parts.back() += strf(" (%.2fx measured peak RSS)", *r.measured_peak_ratio);
    if (r.val_diff_pct)
      parts.push_back("val loss " + pct(*r.val_diff_pct) + " vs " + b.policy);
    else if (d.val_loss && !std::isfinite(*d.val_loss))
      parts.push_back("val loss not finite (diverged)");
    else if (d.val_loss && b.val_loss && !std::isfinite(*b.val_loss))
      parts.push_back("no validation loss to compare (the baseline's is not finite)");
    else
      parts.push_back("no validation loss to compare");
    r.verdict = who + ": " + join(parts, ", ");
    if (r.inside_band)
      r.verdict += strf(" (%s %s seed noise (±%.2f%%))", *r.inside_band ? "inside" : "outside",
                        c.band->policy.c_str(), c.band->spread_pct);
    if (skipped > 0) r.verdict += ", " + skipped_words;
    if (d.status != "completed")
      r.verdict += d.status.empty() ? " [run has no end record]" : " [run " + d.status + "]";
  }
  return c;
}

std::string format_table(const Comparison& c) {
  std::vector<std::vector<std::string>> rows;
  rows.push_back({"run", "policy", "seed", "steps", "tokens", "val loss", "Δ val", "Δ %", "Δ/band",
                  "tok/s", "speed-up", "memory MiB", "mem ratio", "peak RSS MiB", "MFU", "skipped",
                  "overflow/sat", "underflow"});
  for (const auto& r : c.runs) {
    const RunData& d = r.data;
    rows.push_back({d.label + (r.is_baseline ? " *" : ""), d.policy,
                    strf("%llu/%llu", (unsigned long long)d.training_seed, (unsigned long long)d.init_seed),
                    std::to_string(d.steps), std::to_string(d.tokens),
                    !d.val_loss                   ? "-"
                    : std::isfinite(*d.val_loss) ? strf("%.4f", *d.val_loss)
                                                 : std::string("diverged"),
                    r.val_diff ? strf("%+.4f", *r.val_diff) : "-",
                    r.val_diff_pct ? pct(*r.val_diff_pct) : "-",
                    r.val_diff_bands ? strf("%+.2f", *r.val_diff_bands) : "-",
                    d.tokens_per_s ? strf("%.0f", *d.tokens_per_s) : "-",
                    r.speedup ? strf("%.2fx", *r.speedup) : "-",
                    d.memory_bytes > 0 ? mib(d.memory_bytes) : "-",
                    r.memory_ratio ? strf("%.2fx", *r.memory_ratio) : "-",
                    d.measured_peak_bytes ? mib(*d.measured_peak_bytes) : "-",
                    d.mfu ? strf("%.1f%%", 100.0 * *d.mfu) : "-",
                    d.skipped_total ? std::to_string(*d.skipped_total) : "-",
                    fraction(d.cast_total ? d.cast_total->overflow_fraction() : std::nullopt),
                    fraction(d.cast_total ? d.cast_total->underflow_fraction() : std::nullopt)});
  }
  auto width = [](const std::string& s) {  // display width: count UTF-8 lead bytes
    size_t n = 0;
    for (unsigned char ch : s) n += (ch & 0xC0) != 0x80;
    return n;
  };
  std::vector<size_t> w(rows[0].size(), 0);
  for (const auto& row : rows)
    for (size_t i = 0; i < row.size(); ++i) w[i] = std::max(w[i], width(row[i]));
  std::string out;
  for (const auto& row : rows) {
    for (size_t i = 0; i < row.size(); ++i) {
      const std::string pad(w[i] - width(row[i]), ' ');
      out += i < 2 ? row[i] + pad : pad + row[i];  // names left, numbers right
      out += i + 1 < row.size() ? "  " : "\n";
    }
  }
  out += "* baseline; seed = training.seed/model.init_seed; tok/s = mean of the steady-state step "
         "records; memory = predicted total\n";
  out += "MFU: needs the device's peak FLOP/s (unknown on the CPU backend); skipped = steps whose "
         "gradients were not finite; overflow/sat, underflow = fractions of the values cast below "
         "fp32 over the run, all tensor classes (fp8 saturation counts as overflow)\n";
  if (std::any_of(c.runs.begin(), c.runs.end(), [](const RunResult& r) { return r.data.measured_peak_bytes; }))
    out += "peak RSS = measured peak resident memory of the training process, binary and data "
           "included (runs trained by compare --policies)\n";
  if (c.band)
    out += strf("noise band: %s final val loss spread (max - min) over %zu seeds = %.4f (±%.2f%%)\n",
                c.band->policy.c_str(), c.band->runs.size(), c.band->spread, c.band->spread_pct);
  else
    out += "noise band: unknown (needs two or more " + c.runs[c.baseline].data.policy +
           " runs with different seeds)\n";
  out += "\n";
  for (const auto& r : c.runs) out += r.verdict + "\n";
  return out;
}

json to_json(const Comparison& c) {
  auto opt = [](const auto& o) { return o ? json(*o) : json(nullptr); };
  json j;
  j["baseline"] = c.runs[c.baseline].data.label;
  j["baseline_dir"] = c.runs[c.baseline].data.dir;
  j["warnings"] = c.warnings;
  if (c.band)
    j["noise_band"] = {{"policy", c.band->policy}, {"runs", c.band->runs}, {"statistic", "max-min"},
                       {"spread", c.band->spread}, {"spread_pct", c.band->spread_pct}};
  else
    j["noise_band"] = nullptr;
  j["runs"] = json::array();
  for (const auto& r : c.runs) {
    const RunData& d = r.data;
    json e = {{"label", d.label},
              {"dir", d.dir},
              {"policy", d.policy},
              {"training_seed", d.training_seed},
              {"init_seed", d.init_seed},
              {"status", d.status},
              {"is_baseline", r.is_baseline},
              {"steps", d.steps},
              {"tokens", d.tokens},
              {"val_loss", opt(d.val_loss)},
              {"val_step", d.val_step},
              {"val_loss_diff", opt(r.val_diff)},
              {"val_loss_diff_pct", opt(r.val_diff_pct)},
              {"val_loss_diff_bands", opt(r.val_diff_bands)},
              {"inside_noise_band", opt(r.inside_band)},
              {"tokens_per_s", opt(d.tokens_per_s)},
              {"tokens_per_s_records", d.steady_records},
              {"speedup", opt(r.speedup)},
              {"memory_bytes", d.memory_bytes},
              {"memory_ratio", opt(r.memory_ratio)},
              {"measured_peak_bytes", opt(d.measured_peak_bytes)},
              {"measured_peak_ratio", opt(r.measured_peak_ratio)},
              {"mfu", opt(d.mfu)},
              {"skipped_steps", opt(d.skipped_total)},
              {"verdict", r.verdict}};
    auto cast_json = [&](const CastCount& n) {
      return json{{"values", static_cast<int64_t>(n.values)},
                  {"overflow_fraction", opt(n.overflow_fraction())},
                  {"underflow_fraction", opt(n.underflow_fraction())}};
    };
    e["overflow_fraction"] = d.cast_total ? opt(d.cast_total->overflow_fraction()) : json(nullptr);
    e["underflow_fraction"] = d.cast_total ? opt(d.cast_total->underflow_fraction()) : json(nullptr);
    e["casts"] = nullptr;
    if (d.cast_totals) {
      e["casts"] = json::object();
      for (size_t k = 0; k < kCastClasses.size(); ++k) e["casts"][kCastClasses[k]] = cast_json((*d.cast_totals)[k]);
      e["casts"]["all"] = cast_json(*d.cast_total);
    }
    e["eval"] = json::array();
    for (const auto& p : d.eval) e["eval"].push_back({{"step", p.step}, {"tokens", p.tokens}, {"val_loss", p.value}});
    j["runs"].push_back(e);
  }
  return j;
}

}  // namespace mpt::compare
