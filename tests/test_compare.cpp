// `mpt compare` end to end: tiny CPU runs of fp32 (two seeds) and tf32, compared through the
// executable; the table and compare.json against the runs' own metrics, the SVG's
// well-formedness and its curves, and refusals (different models, missing or empty metrics).
// Then the --policies form, which trains the runs itself: what must agree between policies and
// seeds, reruns that train nothing, stops and crashes continued, bad input refused.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cctype>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli_util.h"
#include "compare/compare.h"
#include "compare/svg.h"

namespace fs = std::filesystem;
using nlohmann::json;
using namespace mpt::test;

namespace {

// threads=1 (after kTiny's threads=2): on a loaded machine two OpenMP threads can spin for
// seconds per step; one thread trains these 20 steps in a fraction of a second.
const std::string kRun = kTiny +
                         " --set threads=1 --set training.steps=20 --set training.eval_every=5"
                         " --set training.log_every=2 --set checkpoint.every=0";

std::string slurp(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// A small XML well-formedness check: one root element, matching start and end tags, quoted
// attributes without '<', entity references only of the five predefined kinds or numeric.
// Returns "" when well formed, else what is wrong. `elements` receives every element name.
std::string xml_check(const std::string& s, std::vector<std::string>* elements = nullptr) {
  std::vector<std::string> stack;
  int roots = 0;
  size_t i = 0;
  auto check_text = [&](const std::string& t) -> std::string {
    for (size_t k = 0; k < t.size(); ++k) {
      if (t[k] == '<') return "stray '<'";
      if (static_cast<unsigned char>(t[k]) < 0x20 && t[k] != '\t' && t[k] != '\n' && t[k] != '\r')
        return "a control character XML 1.0 does not allow";
      if (t[k] == '&') {
        const size_t e = t.find(';', k);
        if (e == std::string::npos) return "unterminated entity";
        const std::string ent = t.substr(k + 1, e - k - 1);
        if (ent != "amp" && ent != "lt" && ent != "gt" && ent != "quot" && ent != "apos" &&
            !(ent.size() > 1 && ent[0] == '#'))
          return "unknown entity &" + ent + ";";
      }
    }
    return "";
  };
  while (i < s.size()) {
    const size_t lt = s.find('<', i);
    const std::string text = s.substr(i, lt == std::string::npos ? std::string::npos : lt - i);
    if (auto e = check_text(text); !e.empty()) return e;
    if (stack.empty() && text.find_first_not_of(" \t\r\n") != std::string::npos)
      return "text outside the root element";
    if (lt == std::string::npos) break;
    if (s.compare(lt, 4, "<!--") == 0) {
      const size_t e = s.find("-->", lt);
      if (e == std::string::npos) return "unterminated comment";
      i = e + 3;
      continue;
    }
    if (s.compare(lt, 2, "<?") == 0) {
      const size_t e = s.find("?>", lt);
      if (e == std::string::npos) return "unterminated declaration";
      i = e + 2;
      continue;
    }
    size_t k = lt + 1;
    const bool closing = s[k] == '/';
    if (closing) ++k;
    const size_t name_start = k;
    while (k < s.size() && (std::isalnum(static_cast<unsigned char>(s[k])) || s[k] == '-' || s[k] == ':' || s[k] == '_')) ++k;
    const std::string name = s.substr(name_start, k - name_start);
    if (name.empty()) return "tag without a name at " + std::to_string(lt);
    if (closing) {
      while (k < s.size() && std::isspace(static_cast<unsigned char>(s[k]))) ++k;
      if (k >= s.size() || s[k] != '>') return "bad end tag " + name;
      if (stack.empty() || stack.back() != name) return "end tag " + name + " does not match";
      stack.pop_back();
      i = k + 1;
      continue;
    }
    // attributes
    bool self_close = false;
    for (;;) {
      while (k < s.size() && std::isspace(static_cast<unsigned char>(s[k]))) ++k;
      if (k >= s.size()) return "unterminated tag " + name;
      if (s[k] == '>') break;
      if (s.compare(k, 2, "/>") == 0) {
        self_close = true;
        ++k;
        break;
      }
      const size_t an = k;
      while (k < s.size() && s[k] != '=' && !std::isspace(static_cast<unsigned char>(s[k])) && s[k] != '>') ++k;
      if (k == an || k >= s.size() || s[k] != '=') return "attribute without a value in " + name;
      ++k;
      if (k >= s.size() || (s[k] != '"' && s[k] != '\'')) return "unquoted attribute in " + name;
      const char q = s[k];
      const size_t e = s.find(q, k + 1);
      if (e == std::string::npos) return "unterminated attribute in " + name;
      if (auto err = check_text(s.substr(k + 1, e - k - 1)); !err.empty()) return err + " in an attribute of " + name;
      k = e + 1;
    }
    if (elements) elements->push_back(name);
    if (stack.empty()) ++roots;
    if (!self_close) stack.push_back(name);
    i = k + 1;
  }
  if (!stack.empty()) return "unclosed element " + stack.back();
  if (roots != 1) return "expected one root element, found " + std::to_string(roots);
  return "";
}

size_t count(const std::string& s, const std::string& what) {
  size_t n = 0;
  for (size_t p = s.find(what); p != std::string::npos; p = s.find(what, p + 1)) ++n;
  return n;
}

// The runs are trained once for the whole suite.
class Compare : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    root_ = fs::path(::testing::TempDir()) / ("mpt_compare_runs_" + std::to_string(::getpid()));
    fs::remove_all(root_);
    fs::create_directories(root_);
    for (const auto& [name, extra] : std::vector<std::pair<std::string, std::string>>{
             {"fp32_s1", " --set training.seed=1"},
             {"fp32_s2", " --set training.seed=2"},
             {"tf32_s1", " --set training.seed=1 --set precision=tf32"},
             // A loss scale of 2^40 that may not grow past itself: the first steps overflow
             // in fp16 and are skipped while the scale backs off.
             {"fp16_ovf", " --set training.seed=1 --set precision=fp16"
                          " --set loss_scale.init_scale=1099511627776"
                          " --set loss_scale.max_scale=1099511627776"},
             {"bf16_s1", " --set training.seed=1 --set precision=bf16"},
             {"fp32_l3", " --set training.seed=1 --set model.n_layer=3"}}) {
      const auto r = run(mpt_bin() + " train" + kRun + extra + " --run-dir " + (root_ / name).string());
      ASSERT_EQ(r.code, 0) << name << ": " << r.out;
    }
  }
  static void TearDownTestSuite() { fs::remove_all(root_); }
  void SetUp() override {
    if (!fs::exists(root_ / "fp32_l3" / "metrics.jsonl")) GTEST_SKIP() << "the runs did not train";
    out_ = root_ / ("out_" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()));
  }
  static std::string dir(const std::string& name) { return (root_ / name).string(); }
  static fs::path root_;
  fs::path out_;
};
fs::path Compare::root_;

TEST_F(Compare, TableAndJsonAgreeWithTheRunsOwnMetrics) {
  // tf32 first: the default baseline is still the first fp32 run.
  const auto r = run(mpt_bin() + " compare " + dir("tf32_s1") + " " + dir("fp32_s1") + " " +
                     dir("fp32_s2") + " --out " + out_.string());
  ASSERT_EQ(r.code, 0) << r.out;
  const json j = json::parse(slurp((out_ / "compare.json").string()));
  EXPECT_EQ(j["baseline"], "fp32_s1");
  ASSERT_EQ(j["runs"].size(), 3u);
  for (const char* k : {"baseline", "baseline_dir", "warnings", "noise_band", "runs"})
    EXPECT_TRUE(j.contains(k)) << k;
  EXPECT_TRUE(j["warnings"].empty()) << j["warnings"];

  std::map<std::string, json> by;
  for (const auto& e : j["runs"]) {
    for (const char* k : {"label", "dir", "policy", "training_seed", "init_seed", "status",
                          "is_baseline", "steps", "tokens", "val_loss", "val_step", "val_loss_diff",
                          "val_loss_diff_pct", "val_loss_diff_bands", "inside_noise_band",
                          "tokens_per_s", "tokens_per_s_records", "speedup", "memory_bytes",
                          "memory_ratio", "measured_peak_bytes", "measured_peak_ratio", "verdict",
                          "eval"})
      EXPECT_TRUE(e.contains(k)) << k;
    by[e["label"]] = e;
  }
  EXPECT_EQ(by["tf32_s1"]["policy"], "tf32");
  EXPECT_EQ(by["fp32_s2"]["training_seed"], 2);
  EXPECT_TRUE(by["fp32_s1"]["is_baseline"].get<bool>());

  std::map<std::string, double> tps;
  for (const std::string name : {"fp32_s1", "fp32_s2", "tf32_s1"}) {
    const auto recs = read_jsonl(dir(name) + "/metrics.jsonl");
    const auto evals = events(recs, "eval");
    const auto steps = events(recs, "");
    const json& e = by[name];
    EXPECT_EQ(e["val_loss"].get<double>(), evals.back()["val_loss"].get<double>()) << name;
    EXPECT_EQ(e["val_step"], 20);
    EXPECT_EQ(e["steps"], steps.back()["step"]) << name;
    EXPECT_EQ(e["tokens"], steps.back()["tokens"]) << name;
    EXPECT_EQ(e["steps"], 20);
    EXPECT_EQ(e["status"], "completed");
    EXPECT_EQ(e["eval"].size(), evals.size());
    EXPECT_EQ(e["memory_bytes"].get<double>(), recs.front()["memory"]["total"].get<double>());
    EXPECT_TRUE(e["measured_peak_bytes"].is_null()) << name << ": made by mpt train, not measured";
    // Steady state: the step records after the first 10% of the steps (step > 2), never the first.
    double sum = 0;
    int n = 0;
    for (size_t i = 1; i < steps.size(); ++i)
      if (steps[i]["step"].get<int64_t>() > 2) sum += steps[i]["tokens_per_s"].get<double>(), ++n;
    EXPECT_EQ(e["tokens_per_s_records"], n);
    EXPECT_NEAR(e["tokens_per_s"].get<double>(), sum / n, 1e-9 * sum / n) << name;
    tps[name] = sum / n;
    // The table prints the same numbers.
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.4f", evals.back()["val_loss"].get<double>());
    EXPECT_NE(r.out.find(buf), std::string::npos) << buf << "\n" << r.out;
    EXPECT_NE(r.out.find(std::to_string(steps.back()["tokens"].get<int64_t>())), std::string::npos);
  }
  const double base = by["fp32_s1"]["val_loss"];
  const double tf = by["tf32_s1"]["val_loss"];
  EXPECT_NEAR(by["tf32_s1"]["val_loss_diff"].get<double>(), tf - base, 1e-12);
  EXPECT_NEAR(by["tf32_s1"]["val_loss_diff_pct"].get<double>(), 100 * (tf - base) / base, 1e-9);
  EXPECT_NEAR(by["tf32_s1"]["speedup"].get<double>(), tps["tf32_s1"] / tps["fp32_s1"], 1e-9);
  EXPECT_NEAR(by["tf32_s1"]["memory_ratio"].get<double>(),
              by["tf32_s1"]["memory_bytes"].get<double>() / by["fp32_s1"]["memory_bytes"].get<double>(), 1e-12);

  // Two fp32 seeds: the band is their spread.
  ASSERT_TRUE(j["noise_band"].is_object()) << j.dump(2);
  const double spread = std::fabs(by["fp32_s1"]["val_loss"].get<double>() - by["fp32_s2"]["val_loss"].get<double>());
  EXPECT_GT(spread, 0.0);
  EXPECT_NEAR(j["noise_band"]["spread"].get<double>(), spread, 1e-12);
  EXPECT_EQ(j["noise_band"]["policy"], "fp32");
  EXPECT_EQ(j["noise_band"]["runs"].size(), 2u);
  EXPECT_NEAR(by["tf32_s1"]["val_loss_diff_bands"].get<double>(), (tf - base) / spread, 1e-9);
  EXPECT_EQ(by["tf32_s1"]["inside_noise_band"].get<bool>(), std::fabs(tf - base) <= spread);

  const std::string verdict = by["tf32_s1"]["verdict"];
  for (const char* w : {"tf32: ", "x speed", "x memory", "val loss ", "vs fp32", "fp32 seed noise (±"})
    EXPECT_NE(verdict.find(w), std::string::npos) << w << " in " << verdict;
  EXPECT_NE(r.out.find(verdict), std::string::npos) << r.out;

  // The picture: well formed, a curve per run, the band.
  const std::string svg = slurp((out_ / "compare.svg").string());
  std::vector<std::string> elements;
  EXPECT_EQ(xml_check(svg, &elements), "") << svg.substr(0, 2000);
  ASSERT_FALSE(elements.empty());
  EXPECT_EQ(elements.front(), "svg");
  for (int i = 0; i < 3; ++i) {
    for (const char* kind : {"val-", "train-", "diff-"})
      EXPECT_EQ(count(svg, "id=\"" + std::string(kind) + std::to_string(i) + "\""), 1u) << kind << i;
  }
  EXPECT_EQ(count(svg, "class=\"val-curve\""), 3u);
  EXPECT_EQ(count(svg, "id=\"noise-band\""), 1u);
  EXPECT_EQ(count(svg, "class=\"bar\""), 6u);
  for (const char* label : {"training tokens", "loss (nats/token)", "tokens/s", "MiB", "tf32_s1", "fp32_s2"})
    EXPECT_NE(svg.find(label), std::string::npos) << label;
}

// The last four columns of a run's row in the table: MFU, skipped, overflow/sat, underflow.
std::vector<std::string> numerics_cells(const std::string& table, const std::string& label) {
  std::istringstream in(table);
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream words(line);
    std::vector<std::string> w;
    for (std::string x; words >> x;) w.push_back(x);
    if (w.size() > 4 && w[0] == label) return {w.end() - 4, w.end()};
  }
  return {};
}

std::string fraction3(double f) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.3g", f);
  return buf;
}

TEST_F(Compare, NumericsColumnsAgreeWithTheRunsOwnMetrics) {
  const auto r = run(mpt_bin() + " compare " + dir("fp32_s1") + " " + dir("fp16_ovf") + " " +
                     dir("bf16_s1") + " --out " + out_.string());
  ASSERT_EQ(r.code, 0) << r.out;
  const json j = json::parse(slurp((out_ / "compare.json").string()));
  std::map<std::string, json> by;
  for (const auto& e : j["runs"]) {
    for (const char* k : {"mfu", "skipped_steps", "overflow_fraction", "underflow_fraction", "casts"})
      EXPECT_TRUE(e.contains(k)) << k;
    // No backend knows its device's peak FLOP/s yet, and the CPU has none to give.
    EXPECT_TRUE(e["mfu"].is_null()) << e["mfu"];
    by[e["label"]] = e;
  }
  const char* classes[] = {"activations", "weights", "gradients"};
  for (const std::string name : {"fp32_s1", "fp16_ovf", "bf16_s1"}) {
    const auto steps = events(read_jsonl(dir(name) + "/metrics.jsonl"), "");
    const json& e = by[name];
    const auto cells = numerics_cells(r.out, name);
    ASSERT_EQ(cells.size(), 4u) << name << "\n" << r.out;
    EXPECT_EQ(cells[0], "-") << name;  // MFU
    const int64_t skipped = steps.back()["skipped_total"].get<int64_t>();
    EXPECT_EQ(e["skipped_steps"].get<int64_t>(), skipped) << name;
    EXPECT_EQ(cells[1], std::to_string(skipped)) << name;
    if (name == "fp32_s1") {
      EXPECT_EQ(skipped, 0);
      EXPECT_TRUE(e["casts"].is_null()) << e["casts"];
      EXPECT_TRUE(e["overflow_fraction"].is_null());
      EXPECT_TRUE(e["underflow_fraction"].is_null());
      EXPECT_EQ(cells[2], "-");
      EXPECT_EQ(cells[3], "-");
      continue;
    }
    // Each record's fractions are over its own casts: weighted by its values.
    double values = 0, over = 0, under = 0;
    for (const char* k : classes) {
      double v = 0, o = 0, u = 0;
      for (const auto& s : steps) {
        const json& c = s["casts"][k];
        v += c["values"].get<double>();
        o += c["values"].get<double>() * c["overflow"].get<double>();
        u += c["values"].get<double>() * c["underflow"].get<double>();
      }
      ASSERT_GT(v, 0) << name << " " << k;
      const json& got = e["casts"][k];
      EXPECT_EQ(got["values"].get<double>(), v) << name << " " << k;
      EXPECT_NEAR(got["overflow_fraction"].get<double>(), o / v, 1e-12) << name << " " << k;
      EXPECT_NEAR(got["underflow_fraction"].get<double>(), u / v, 1e-12) << name << " " << k;
      values += v, over += o, under += u;
    }
    EXPECT_NEAR(e["overflow_fraction"].get<double>(), over / values, 1e-12) << name;
    EXPECT_NEAR(e["underflow_fraction"].get<double>(), under / values, 1e-12) << name;
    EXPECT_EQ(e["casts"]["all"]["values"].get<double>(), values) << name;
    EXPECT_EQ(cells[2], fraction3(over / values)) << name;
    EXPECT_EQ(cells[3], fraction3(under / values)) << name;
  }
  // The forced overflow: skipped steps, counted in the verdict; fp16 overflowed, bf16 did not.
  const int64_t skipped = by["fp16_ovf"]["skipped_steps"];
  EXPECT_GT(skipped, 0);
  const std::string verdict = by["fp16_ovf"]["verdict"];
  EXPECT_NE(verdict.find(std::to_string(skipped) + " skipped step"), std::string::npos) << verdict;
  EXPECT_NE(r.out.find(verdict), std::string::npos) << r.out;
  EXPECT_GT(by["fp16_ovf"]["overflow_fraction"].get<double>(), 0.0);
  EXPECT_EQ(by["bf16_s1"]["skipped_steps"], 0);
  EXPECT_EQ(by["bf16_s1"]["verdict"].get<std::string>().find("skipped"), std::string::npos);
  EXPECT_EQ(by["fp32_s1"]["verdict"].get<std::string>().find("skipped"), std::string::npos);
}

// A run written before the numerics fields existed: its skipped steps and casts are unknown.
TEST_F(Compare, RunsWithoutNumericsFieldsShowThemUnknown) {
  fs::create_directories(root_ / "old_fp16");
  {
    std::ofstream f(root_ / "old_fp16" / "metrics.jsonl");
    for (auto rec : read_jsonl(dir("fp16_ovf") + "/metrics.jsonl")) {
      for (const char* k : {"casts", "skipped", "skipped_total", "loss_scale"}) rec.erase(k);
      f << rec.dump() << "\n";
    }
  }
  const auto c = mpt::compare::compare_runs({dir("fp32_s1"), (root_ / "old_fp16").string()});
  EXPECT_FALSE(c.runs[1].data.skipped_total.has_value());
  EXPECT_FALSE(c.runs[1].data.cast_total.has_value());
  EXPECT_EQ(c.runs[1].verdict.find("skipped"), std::string::npos) << c.runs[1].verdict;
  const auto cells = numerics_cells(mpt::compare::format_table(c), "old_fp16");
  EXPECT_EQ(cells, (std::vector<std::string>{"-", "-", "-", "-"}));
  const json j = mpt::compare::to_json(c);
  EXPECT_TRUE(j["runs"][1]["skipped_steps"].is_null());
  EXPECT_TRUE(j["runs"][1]["casts"].is_null());
  EXPECT_EQ(j["runs"][0]["skipped_steps"], 0);
}

TEST_F(Compare, BaselineOptionAndNoBandWithOneSeed) {
  const auto r = run(mpt_bin() + " compare " + dir("fp32_s1") + " " + dir("tf32_s1") + " --baseline " +
                     dir("tf32_s1") + " --out " + out_.string());
  ASSERT_EQ(r.code, 0) << r.out;
  const json j = json::parse(slurp((out_ / "compare.json").string()));
  EXPECT_EQ(j["baseline"], "tf32_s1");
  EXPECT_TRUE(j["noise_band"].is_null());
  EXPECT_TRUE(j["runs"][1]["is_baseline"].get<bool>());
  EXPECT_NE(r.out.find("vs tf32"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("noise band: unknown"), std::string::npos) << r.out;
  const std::string svg = slurp((out_ / "compare.svg").string());
  EXPECT_EQ(xml_check(svg), "");
  EXPECT_EQ(count(svg, "noise-band\""), 0u);
  EXPECT_EQ(count(svg, "class=\"val-curve\""), 2u);

  // Without --out nothing is written.
  const auto cwd = fs::path(::testing::TempDir()) / ("mpt_compare_cwd_" + std::to_string(::getpid()));
  fs::create_directories(cwd);
  const auto r2 = run("cd " + cwd.string() + " && " + mpt_bin() + " compare " + dir("fp32_s1") + " " + dir("tf32_s1"));
  EXPECT_EQ(r2.code, 0) << r2.out;
  EXPECT_TRUE(fs::is_empty(cwd));
  fs::remove_all(cwd);

  // A --baseline that is not among the runs is bad input.
  const auto r3 = run(mpt_bin() + " compare " + dir("fp32_s1") + " --baseline " + dir("tf32_s1"));
  EXPECT_EQ(r3.code, 2) << r3.out;

  // An --out that cannot be one (a file; empty, as an unset $OUT gives) is refused before the
  // comparison prints anything.
  const std::string file = (fs::path(::testing::TempDir()) /
                            ("mpt_compare_file_" + std::to_string(::getpid()))).string();
  std::ofstream(file) << "x";
  for (const std::string& out : {file, std::string("''")}) {
    const auto r4 = run(mpt_bin() + " compare " + dir("fp32_s1") + " --out " + out);
    EXPECT_EQ(r4.code, 2) << r4.out;
    EXPECT_NE(r4.out.find("--out"), std::string::npos) << r4.out;
    EXPECT_EQ(r4.out.find("val loss"), std::string::npos) << "no table first: " << r4.out;
  }
  fs::remove(file);
}

TEST_F(Compare, RefusesDifferentModelsAndNamesBadMetrics) {
  auto r = run(mpt_bin() + " compare " + dir("fp32_s1") + " " + dir("fp32_l3") + " --out " + out_.string());
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("model.n_layer"), std::string::npos) << r.out;
  EXPECT_FALSE(fs::exists(out_ / "compare.json"));

  // The same run twice, spelled two ways.
  r = run(mpt_bin() + " compare " + dir("fp32_s1") + " " + dir("fp32_s2") + " " + dir("fp32_s1") +
          "/.");
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("are the same run"), std::string::npos) << r.out;

  fs::create_directories(root_ / "no_metrics");
  r = run(mpt_bin() + " compare " + dir("fp32_s1") + " " + dir("no_metrics"));
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find(dir("no_metrics") + "/metrics.jsonl"), std::string::npos) << r.out;

  fs::create_directories(root_ / "empty_metrics");
  std::ofstream(root_ / "empty_metrics" / "metrics.jsonl").close();
  r = run(mpt_bin() + " compare " + dir("empty_metrics") + " " + dir("fp32_s1"));
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find(dir("empty_metrics") + "/metrics.jsonl"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("empty"), std::string::npos) << r.out;

  EXPECT_EQ(run(mpt_bin() + " compare").code, 2);
  r = run(mpt_bin() + " compare --help");
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("--baseline"), std::string::npos) << r.out;

  // A line in the middle that is not JSON is named with its line number.
  fs::create_directories(root_ / "damaged");
  const std::string text = slurp(dir("fp32_s2") + "/metrics.jsonl");
  {
    std::ofstream f(root_ / "damaged" / "metrics.jsonl");
    f << text.substr(0, text.find('\n') + 1) << "{not json\n" << text.substr(text.find('\n') + 1);
  }
  r = run(mpt_bin() + " compare " + dir("fp32_s1") + " " + dir("damaged"));
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find(dir("damaged") + "/metrics.jsonl:2"), std::string::npos) << r.out;
}

// A run cut off by a crash: the last line is incomplete and there is no end record. It is
// compared as far as it got, and its verdict says so.
TEST_F(Compare, CutOffRunIsComparedAsFarAsItGot) {
  const auto recs = read_jsonl(dir("tf32_s1") + "/metrics.jsonl");
  fs::create_directories(root_ / "cut");
  int64_t last_eval_step = 0;
  double last_val = 0;
  {
    std::ofstream f(root_ / "cut" / "metrics.jsonl");
    for (const auto& rec : recs) {
      if (rec.contains("step") && rec["step"].get<int64_t>() > 12) break;
      if (rec.value("event", "") == "eval") last_eval_step = rec["step"], last_val = rec["val_loss"];
      f << rec.dump() << "\n";
    }
    f << "{\"step\": 14, \"tok";
  }
  const auto c = mpt::compare::compare_runs({dir("fp32_s1"), (root_ / "cut").string()});
  const auto& cut = c.runs[1];
  EXPECT_EQ(cut.data.steps, 12);
  EXPECT_EQ(cut.data.status, "");
  EXPECT_EQ(cut.data.val_step, last_eval_step);
  EXPECT_EQ(*cut.data.val_loss, last_val);
  EXPECT_NE(cut.verdict.find("[run has no end record]"), std::string::npos) << cut.verdict;
}

// A run resumed from an older checkpoint (or one that wrote records past its last checkpoint
// before a crash) has a second start record with resume_step: what came after that step before
// it, and how that attempt ended, are gone. Here a completed run resumed from step 8 that got to
// step 12 and has no end record yet: compared as far as the resumed attempt got.
TEST_F(Compare, AResumedRunIsComparedFromWhereItResumed) {
  const auto recs = read_jsonl(dir("tf32_s1") + "/metrics.jsonl");
  ASSERT_EQ(recs.back().value("event", ""), "end");
  fs::create_directories(root_ / "resumed");
  int64_t last_eval_step = -1;
  double last_val = 0;
  {
    std::ofstream f(root_ / "resumed" / "metrics.jsonl");
    for (const auto& rec : recs) f << rec.dump() << "\n";  // the whole first attempt
    json start = recs.front();
    start["resume_step"] = 8;
    f << start.dump() << "\n";
    for (const auto& rec : recs) {
      if (rec.value("event", "") == "start" || !rec.contains("step")) continue;
      const int64_t step = rec["step"];
      if (step <= 8 || step > 12 || rec.value("event", "") == "end") continue;
      f << rec.dump() << "\n";
    }
  }
  for (const auto& rec : recs)
    if (rec.value("event", "") == "eval" && rec["step"].get<int64_t>() <= 12)
      last_eval_step = rec["step"], last_val = rec["val_loss"];
  const auto c = mpt::compare::compare_runs({dir("fp32_s1"), (root_ / "resumed").string()});
  const auto& r = c.runs[1];
  EXPECT_EQ(r.data.steps, 12);
  EXPECT_EQ(r.data.status, "") << "the first attempt's end record no longer holds";
  EXPECT_EQ(r.data.val_step, last_eval_step);
  EXPECT_EQ(*r.data.val_loss, last_val);
  ASSERT_FALSE(r.data.train.empty());
  EXPECT_EQ(r.data.train.back().step, 12);
  EXPECT_NE(r.verdict.find("[run has no end record]"), std::string::npos) << r.verdict;
}

// A run that diverged is a result, not malformed input: its losses are the strings "nan" or
// "inf" in the records (JSON has no NaN; other writers give null, "NaN" or "Infinity"), its
// verdict says so, and
// neither it nor a diverged baseline gives a difference or joins the noise band.
TEST_F(Compare, DivergedRunsAreComparedAsDiverged) {
  const std::string div = (root_ / "diverged").string();
  if (!fs::exists(div + "/metrics.jsonl")) {
    const auto t = run(mpt_bin() + " train" + kRun + " --set training.seed=1 --set training.steps=6"
                       " --set optimizer.lr=1e30 --set optimizer.grad_clip=0 --run-dir " + div);
    ASSERT_EQ(t.code, 1) << "a run whose final validation loss is not finite fails: " << t.out;
    EXPECT_NE(t.out.find("training diverged"), std::string::npos) << t.out;
  }
  const auto recs = read_jsonl(div + "/metrics.jsonl");
  const json last_val = events(recs, "eval").back()["val_loss"];
  ASSERT_TRUE(last_val == "nan" || last_val == "inf") << last_val;
  EXPECT_EQ(events(recs, "end").back()["status"], "failed");
  EXPECT_FALSE(fs::exists(div + "/checkpoints/step_00000006")) << "no broken final checkpoint";

  auto r = run(mpt_bin() + " compare " + dir("fp32_s1") + " " + dir("fp32_s2") + " " + div +
               " --out " + out_.string());
  ASSERT_EQ(r.code, 0) << r.out;
  json j = json::parse(slurp((out_ / "compare.json").string()));
  const json& d = j["runs"][2];
  EXPECT_TRUE(d["val_loss"].is_null()) << d;
  EXPECT_TRUE(d["val_loss_diff"].is_null()) << d;
  EXPECT_NE(d["verdict"].get<std::string>().find("val loss not finite (diverged)"),
            std::string::npos) << d["verdict"];
  EXPECT_NE(d["verdict"].get<std::string>().find("[run failed]"), std::string::npos);
  EXPECT_TRUE(j["runs"][1]["val_loss_diff"].is_number()) << "the finite runs still compare";
  const std::string svg = slurp((out_ / "compare.svg").string());
  EXPECT_EQ(xml_check(svg), "");
  for (const std::string& bad : {std::string("nan"), std::string("inf")})  // as printf writes
    for (const char* before : {" ", ",", "\"", "-", ">"})  // them
      EXPECT_EQ(svg.find(before + bad), std::string::npos) << "no " << bad << " in the picture";
  EXPECT_NE(svg.find("val diverged"), std::string::npos);
  EXPECT_NE(r.out.find("diverged"), std::string::npos) << "the table: " << r.out;
  // The diverged run as the baseline; and the forms other writers use for NaN and infinity.
  fs::create_directories(root_ / "diverged_strings");
  {
    std::ofstream f(root_ / "diverged_strings" / "metrics.jsonl");
    for (json rec : recs) {
      if (rec.contains("loss") && rec["loss"].is_string()) rec["loss"] = nullptr;
      if (rec.contains("val_loss") && rec["val_loss"].is_string()) rec["val_loss"] = "Infinity";
      f << rec.dump() << "\n";
    }
  }
  const auto c = mpt::compare::compare_runs(
      {(root_ / "diverged_strings").string(), dir("fp32_s1"), dir("fp32_s2")});
  ASSERT_TRUE(c.runs[0].data.val_loss.has_value());
  EXPECT_TRUE(std::isinf(*c.runs[0].data.val_loss));
  EXPECT_NE(c.runs[0].verdict.find("val loss not finite"), std::string::npos) << c.runs[0].verdict;
  EXPECT_FALSE(c.runs[1].val_diff.has_value());
  EXPECT_NE(c.runs[1].verdict.find("the baseline's is not finite"), std::string::npos)
      << c.runs[1].verdict;
}

// Run names come from directory names, which may hold control characters: the picture stays
// valid XML (they become U+FFFD).
TEST_F(Compare, ControlCharactersInRunNamesKeepThePictureValid) {
  auto c = mpt::compare::compare_runs({dir("fp32_s1"), dir("fp32_s2")});
  c.runs[1].data.label = std::string("odd\x01name\x1b[0m");
  const std::string svg = mpt::compare::render_svg(c);
  EXPECT_EQ(xml_check(svg), "");
  EXPECT_NE(svg.find("odd\xEF\xBF\xBDname"), std::string::npos);
}

TEST_F(Compare, WarnsWhenTrainingKeysDiffer) {
  // A copy of a run whose start record says it trained for 30 steps.
  fs::create_directories(root_ / "steps30");
  auto recs = read_jsonl(dir("fp32_s2") + "/metrics.jsonl");
  recs.front()["config"]["training"]["steps"] = 30;
  recs.front()["config"]["optimizer"]["lr"] = 0.002;
  {
    std::ofstream f(root_ / "steps30" / "metrics.jsonl");
    for (const auto& rec : recs) f << rec.dump() << "\n";
  }
  const auto r = run(mpt_bin() + " compare " + dir("fp32_s1") + " " + dir("steps30"));
  EXPECT_EQ(r.code, 0) << r.out;
  const size_t w = r.out.find("warning");
  ASSERT_NE(w, std::string::npos) << r.out;
  const std::string line = r.out.substr(w, r.out.find('\n', w) - w);
  EXPECT_NE(line.find("training.steps"), std::string::npos) << line;
  EXPECT_NE(line.find("optimizer.lr"), std::string::npos) << line;
  EXPECT_EQ(line.find("training.seed"), std::string::npos) << line;  // seeds may differ
}

// ---- mpt compare --policies: the runs trained from one config

// Eight steps of the tiny model, a step record every 2 and an eval every 4; checkpoints only at
// the end and when stopped.
const std::string kPolicyRun = kTiny +
                               " --set threads=1 --set training.steps=8 --set training.eval_every=4"
                               " --set training.log_every=2 --set checkpoint.every=0";

class ComparePolicies : public CliTest {
 protected:
  // `mpt compare --policies ...` into DIR/cmp, run from DIR (so that anything created by
  // mistake would show there), with `env` (e.g. "MPT_FAULT=... ") before the command.
  Result compare(const std::string& args, const std::string& env = "") const {
    return run("cd " + dir_.string() + " && " + env + mpt_bin() + " compare" + kPolicyRun + " " +
               args + " --out cmp");
  }
  std::string run_dir(const std::string& name) const { return path("cmp/runs/" + name); }
  std::vector<json> metrics(const std::string& name) const {
    return read_jsonl(run_dir(name) + "/metrics.jsonl");
  }
  // Every file of every run, by path, to tell whether a command changed any.
  std::map<std::string, std::string> snapshot() const {
    std::map<std::string, std::string> files;
    for (const auto& e : fs::recursive_directory_iterator(path("cmp/runs")))
      if (e.is_regular_file()) files[e.path().string()] = slurp(e.path().string());
    return files;
  }
};

double first_value(const std::vector<json>& recs, const std::string& kind, const char* field) {
  const auto v = events(recs, kind);
  return v.empty() ? std::nan("") : v.front()[field].get<double>();
}

TEST_F(ComparePolicies, TrainsEachPolicyFromTheSameStartAndReportsLikeTheRunDirForm) {
  auto r = compare("--policies fp32,tf32 --seeds 2");
  ASSERT_EQ(r.code, 0) << r.out;
  // The baseline policy with two data seeds, the other with the first.
  for (const std::string name : {"fp32-seed1", "fp32-seed2", "tf32-seed1"}) {
    const auto recs = metrics(name);
    ASSERT_FALSE(recs.empty()) << name;
    EXPECT_EQ(recs.back()["status"], "completed") << name;
  }
  EXPECT_FALSE(fs::exists(run_dir("tf32-seed2")));
  const json c1 = metrics("fp32-seed1").front()["config"], c2 = metrics("fp32-seed2").front()["config"],
             t1 = metrics("tf32-seed1").front()["config"];
  EXPECT_EQ(c1["precision"], "fp32");
  EXPECT_EQ(t1["precision"], "tf32");
  EXPECT_EQ(c2["training"]["seed"].get<uint64_t>(), c1["training"]["seed"].get<uint64_t>() + 1);
  EXPECT_EQ(t1["training"]["seed"], c1["training"]["seed"]);
  EXPECT_EQ(c2["model"]["init_seed"], c1["model"]["init_seed"]);
  EXPECT_EQ(t1["model"]["init_seed"], c1["model"]["init_seed"]);

  // Step 0 evaluates the initial weights on the validation split's first batches, which no
  // seed changes: fp32 with the same init_seed gives the same loss to the bit; tf32 rounds the
  // matmul operands to a 10-bit mantissa (relative error <= 2^-11 each), which moves the loss
  // (~5.5 nats, logits far below 1 at init) by far less than 1e-3.
  const double v_f1 = first_value(metrics("fp32-seed1"), "eval", "val_loss");
  const double v_f2 = first_value(metrics("fp32-seed2"), "eval", "val_loss");
  const double v_t1 = first_value(metrics("tf32-seed1"), "eval", "val_loss");
  EXPECT_EQ(v_f1, v_f2);
  EXPECT_NE(v_t1, v_f1);
  EXPECT_NEAR(v_t1, v_f1, 1e-3);
  // Step 1's loss is the forward pass on the first training batch, before any update: the same
  // batch for the same training.seed (tf32 again only rounded), another one for the next seed,
  // which moves the loss by more than the rounding does.
  const double l_f1 = first_value(metrics("fp32-seed1"), "", "loss");
  const double l_f2 = first_value(metrics("fp32-seed2"), "", "loss");
  const double l_t1 = first_value(metrics("tf32-seed1"), "", "loss");
  EXPECT_NE(l_t1, l_f1);
  EXPECT_NEAR(l_t1, l_f1, 1e-3);
  EXPECT_NE(l_f2, l_f1);
  EXPECT_GT(std::fabs(l_f2 - l_f1), std::fabs(l_t1 - l_f1));

  // The report: the first policy's first seed is the baseline, its two seeds make the band,
  // and every run carries its measured peak memory.
  const json j = json::parse(slurp(path("cmp/compare.json")));
  EXPECT_EQ(j["baseline"], "fp32-seed1");
  ASSERT_TRUE(j["noise_band"].is_object()) << j.dump(2);
  EXPECT_EQ(j["noise_band"]["runs"], json({"fp32-seed1", "fp32-seed2"}));
  ASSERT_EQ(j["runs"].size(), 3u);
  std::vector<std::string> labels;
  for (const auto& e : j["runs"]) {
    labels.push_back(e["label"]);
    const json peak = json::parse(slurp(run_dir(e["label"]) + "/peak_memory.json"));
    ASSERT_EQ(peak["processes"].size(), 1u) << peak;
    EXPECT_GT(peak["peak_rss_bytes"].get<double>(), 1 << 20) << peak;  // a process, not a ledger
    EXPECT_EQ(e["measured_peak_bytes"].get<double>(), peak["peak_rss_bytes"].get<double>());
    EXPECT_TRUE(e["measured_peak_ratio"].is_number()) << e;
  }
  EXPECT_EQ(labels, (std::vector<std::string>{"fp32-seed1", "fp32-seed2", "tf32-seed1"}));
  EXPECT_NE(r.out.find("peak RSS MiB"), std::string::npos) << r.out;
  const std::string svg = slurp(path("cmp/compare.svg"));
  EXPECT_EQ(xml_check(svg), "");
  EXPECT_EQ(count(svg, "class=\"bar-measured\""), 3u);
  EXPECT_EQ(count(svg, "id=\"noise-band\""), 1u);
  // ... which is what the RUN_DIR form says of the same directories (named as the first did).
  const auto again = run("cd " + dir_.string() + " && " + mpt_bin() +
                         " compare cmp/runs/fp32-seed1 cmp/runs/fp32-seed2 cmp/runs/tf32-seed1"
                         " --out again");
  ASSERT_EQ(again.code, 0) << again.out;
  EXPECT_EQ(slurp(path("again/compare.json")), slurp(path("cmp/compare.json")));

  // The same command again trains nothing: every run's files stay as they were.
  const auto before = snapshot();
  r = compare("--policies fp32,tf32 --seeds 2");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(count(r.out, "completed earlier, not trained again"), 3u) << r.out;
  EXPECT_TRUE(snapshot() == before);

  // Another plan into the same directory is refused, naming what differs; nothing changes.
  r = compare("--policies fp32,tf32 --seeds 3");
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("compare-plan.json"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("seeds: 2 there, 3 in this command"), std::string::npos) << r.out;
  r = compare("--policies fp32,tf32 --seeds 2 --set training.steps=9");
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("config.training.steps"), std::string::npos) << r.out;
  EXPECT_TRUE(snapshot() == before);
}

// Stopped in its first run (a simulated SIGTERM at step 3): the comparison stops with exit code
// 3 before the next run; the same command continues the run from its checkpoint, and it ends
// exactly where an uninterrupted `mpt train` of the same config does.
TEST_F(ComparePolicies, AStoppedRunContinuesExactly) {
  auto r = compare("--policies fp32,tf32", "MPT_FAULT=preempt_at_step=3 ");
  ASSERT_EQ(r.code, 3) << r.out;
  EXPECT_EQ(metrics("fp32-seed1").back()["status"], "stopped");
  EXPECT_FALSE(fs::exists(run_dir("tf32-seed1")));
  EXPECT_FALSE(fs::exists(path("cmp/compare.json")));

  r = compare("--policies fp32,tf32");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("fp32-seed1: continuing from"), std::string::npos) << r.out;
  const auto resumed = metrics("fp32-seed1");
  EXPECT_EQ(events(resumed, "start").size(), 2u);
  EXPECT_EQ(events(resumed, "start")[1]["resume_step"], 3);
  EXPECT_EQ(json::parse(slurp(run_dir("fp32-seed1") + "/peak_memory.json"))["processes"].size(), 2u);
  EXPECT_EQ(metrics("tf32-seed1").back()["status"], "completed");

  r = run(mpt_bin() + " train" + kPolicyRun + " --set precision=fp32 --run-dir " + path("straight"));
  ASSERT_EQ(r.code, 0) << r.out;
  const auto straight = read_jsonl(path("straight/metrics.jsonl"));
  EXPECT_EQ(without_timing(events(resumed, "")), without_timing(events(straight, "")));
  EXPECT_EQ(events(resumed, "eval"), events(straight, "eval"));
  EXPECT_TRUE(slurp(run_dir("fp32-seed1") + "/checkpoints/step_00000008/model.safetensors") ==
              slurp(path("straight/checkpoints/step_00000008/model.safetensors")));
}

// A real SIGTERM sent to the comparison's own process (as `kill PID` or a scheduler does)
// reaches the training process, which saves and stops; the comparison exits 3 without
// starting the next run.
TEST_F(ComparePolicies, ASignalToTheComparisonStopsItBeforeTheNextRun) {
  const std::string script = write(
      "stop.sh",
      "cd " + dir_.string() + "\n" + mpt_bin() + " compare" + kTiny +
          " --set threads=1 --set training.steps=5000 --set training.log_every=1"
          " --set checkpoint.every=0 --policies fp32,tf32 --out cmp > log 2>&1 &\n"
          "pid=$!\n"
          "i=0\n"
          "until grep -qs '\"step\"' cmp/runs/fp32-seed1/metrics.jsonl || [ $i -ge 1500 ]; do\n"
          "  sleep 0.02; i=$((i+1))\n"
          "done\n"
          "kill -TERM $pid\n"
          "wait $pid\n"
          "echo \"exit code $?\"\n");
  const auto r = run("sh " + script);
  EXPECT_NE(r.out.find("exit code 3"), std::string::npos) << r.out << slurp(path("log"));
  const auto recs = metrics("fp32-seed1");
  ASSERT_FALSE(recs.empty());
  EXPECT_EQ(recs.back()["status"], "stopped") << recs.back();
  EXPECT_EQ(recs.back()["signal"], 15);
  EXPECT_LT(recs.back()["step"].get<int64_t>(), 5000);
  EXPECT_FALSE(fs::exists(run_dir("tf32-seed1")));
}

// A training process that dies before its first checkpoint leaves nothing to continue from: the
// rerun moves the run aside (never mixing it with the new start) and trains it from step 0.
TEST_F(ComparePolicies, ARunWithoutACheckpointStartsAgainMovedAside) {
  auto r = compare("--policies fp32", "MPT_FAULT=crash=before_rename ");
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.out.find("run the same command again"), std::string::npos) << r.out;
  EXPECT_TRUE(metrics("fp32-seed1").back().value("event", "") != "end");

  r = compare("--policies fp32");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("cannot be continued"), std::string::npos) << r.out;
  std::vector<fs::path> aside;
  for (const auto& e : fs::directory_iterator(path("cmp/abandoned"))) aside.push_back(e.path());
  ASSERT_EQ(aside.size(), 1u);
  EXPECT_EQ(aside[0].filename().string().rfind("fp32-seed1-", 0), 0u) << aside[0];
  EXPECT_TRUE(read_jsonl((aside[0] / "metrics.jsonl").string()).back().value("event", "") != "end");
  const auto recs = metrics("fp32-seed1");
  EXPECT_EQ(events(recs, "start").size(), 1u);  // a new run, not a continuation
  EXPECT_EQ(recs.back()["status"], "completed");
}

TEST_F(ComparePolicies, BadInputExitsTwoAndCreatesNothing) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"--policies fp32,fp99", "--policies fp99"},
      {"--policies fp32,,tf32", "empty policy name"},
      {"--policies fp32,fp32", "listed twice"},
      {"--policies fp32 --seeds 0", "--seeds 0"},
      {"--policies fp32 --seeds two", "--seeds"},
      {"--policies fp32 --config missing.yaml", "missing.yaml"},
      {"--policies fp32 --baseline tf32", "--baseline tf32"},
      {"--policies fp32 --set precision=tf32", "--set precision=tf32"},
      {"--policies fp32 some_run_dir", "not both"},
      // Refused by the trainer's own checks, run as a dry run before anything is created.
      {"--policies fp32 --set model.n_layer=200 --set model.n_embd=100000", "nothing was created"},
  };
  for (const auto& [args, said] : cases) {
    const auto r = compare(args);
    EXPECT_EQ(r.code, 2) << args << "\n" << r.out;
    EXPECT_NE(r.out.find(said), std::string::npos) << args << ": no '" << said << "' in\n" << r.out;
    EXPECT_TRUE(fs::is_empty(dir_)) << args;
  }
  // --out is required with --policies; --seeds, --set and --config need --policies.
  auto r = run("cd " + dir_.string() + " && " + mpt_bin() + " compare --policies fp32");
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("--out"), std::string::npos) << r.out;
  r = run("cd " + dir_.string() + " && " + mpt_bin() + " compare --seeds 2 some_run_dir");
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("--seeds goes with --policies"), std::string::npos) << r.out;
  EXPECT_TRUE(fs::is_empty(dir_));
  // An --out that is a file, or a directory holding something else, is not taken over.
  write("cmp", "a file");
  r = compare("--policies fp32");
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("not a directory"), std::string::npos) << r.out;
  fs::remove(path("cmp"));
  fs::create_directories(path("cmp"));
  write("cmp/notes.txt", "mine");
  r = compare("--policies fp32");
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("compare-plan.json"), std::string::npos) << r.out;
  EXPECT_EQ(std::distance(fs::directory_iterator(path("cmp")), fs::directory_iterator()), 1);
}

TEST(CompareUnit, SteadyStateAndXmlEscape) {
  using mpt::compare::CurvePoint;
  std::vector<CurvePoint> sp;
  for (int s : {1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100}) sp.push_back({s, s * 10, 1.0 * s});
  // warm-up: steps <= 10 (10% of 100) and the first record
  EXPECT_EQ(mpt::compare::steady_state_records(sp), (std::vector<size_t>{2, 3, 4, 5, 6, 7, 8, 9, 10}));
  EXPECT_EQ(mpt::compare::steady_state_records({sp[0]}), (std::vector<size_t>{0}));
  EXPECT_EQ(mpt::compare::steady_state_records({sp[0], sp[1]}), (std::vector<size_t>{1}));
  EXPECT_EQ(mpt::compare::xml_escape("a<b&\"c'>"), "a&lt;b&amp;&quot;c&apos;&gt;");
  EXPECT_EQ(xml_check("<a x=\"1\"><b/>t &amp; u</a>"), "");
  EXPECT_NE(xml_check("<a><b></a>"), "");
  EXPECT_NE(xml_check("<a>&</a>"), "");
}

}  // namespace
