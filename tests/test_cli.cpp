// End to end through the `mpt` executable: the README's training command, learning on the
// built-in corpus, determinism, data preparation, and table-driven bad input (exit 2, a message
// naming the key or file, and no run directory left behind).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli_util.h"
#include "config/config.h"
#include "data/corpus.h"
#include "data/shard.h"

namespace fs = std::filesystem;
using nlohmann::json;
using namespace mpt::test;

namespace {
using Cli = CliTest;
}  // namespace

TEST_F(Cli, VersionHelpAndUsageErrors) {
  auto r = run(mpt_bin() + " --version");
  EXPECT_EQ(r.code, 0);
  EXPECT_NE(r.out.find(std::string("mpt ") + MPT_VERSION), std::string::npos) << r.out;
  r = run(mpt_bin() + " frobnicate");
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.out.find("unknown subcommand 'frobnicate' (expected one of: train, inspect, data, "
                       "compare"), std::string::npos) << r.out;
  for (const char* sub : {"train", "data", "data prepare", "data inspect"}) {
    r = run(mpt_bin() + " " + sub + " --help");
    EXPECT_EQ(r.code, 0) << sub;
    EXPECT_NE(r.out.find("Usage"), std::string::npos) << sub << ": " << r.out;
  }
  EXPECT_EQ(run(mpt_bin()).code, 2);
  EXPECT_EQ(run(mpt_bin() + " frobnicate").code, 2);
  EXPECT_EQ(run(mpt_bin() + " train " + path("nope.yaml")).code, 2);
  EXPECT_EQ(run(mpt_bin() + " data prepare --out " + path("x")).code, 2);
}

// The README's command (scripts/train), with the step count lowered.
TEST_F(Cli, ReadmeTrainingCommandWritesConfigAndMetrics) {
  const std::string run_dir = path("run");
  auto r = run("MPT_SKIP_SETUP=1 MPT_BUILD_DIR=" + std::string(MPT_BUILD_DIR) + " " +
               MPT_SOURCE_DIR + "/scripts/train --set training.steps=12 --set training.log_every=5"
               " --set training.eval_every=6 --set training.eval_batches=2 --run-dir " + run_dir);
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("step     12/12"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("ETA"), std::string::npos) << r.out;

  // config.yaml is the fully resolved config and loads back to the same thing
  const mpt::Config resolved = mpt::load_config(run_dir + "/config.yaml");
  EXPECT_EQ(resolved.training.steps, 12);
  EXPECT_EQ(mpt::config_to_yaml(resolved),
            mpt::config_to_yaml(mpt::load_config(std::string(MPT_SOURCE_DIR) + "/configs/default.yaml",
                                                 {"training.steps=12", "training.log_every=5",
                                                  "training.eval_every=6", "training.eval_batches=2"})));

  const auto recs = read_jsonl(run_dir + "/metrics.jsonl");
  ASSERT_GE(recs.size(), 4u);
  const json& start = recs.front();
  EXPECT_EQ(start["event"], "start");
  for (const char* k : {"version", "backend", "threads", "n_params", "flops_per_token", "config",
                        "precision", "time"})
    EXPECT_TRUE(start.contains(k)) << k;
  EXPECT_EQ(start["backend"], "cpu");
  EXPECT_EQ(start["attention_kernel"], "reference");
  EXPECT_EQ(start["gemm_output"], "reference");
  EXPECT_EQ(start["fp8_producers"], false);  // the default config is not fp8
  for (const char* role : {"parameters", "master_weights", "gradients", "optimizer_state",
                           "activations", "workspace", "total"})
    EXPECT_TRUE(start["memory"].contains(role)) << role;
  EXPECT_GT(start["memory"]["total"].get<double>(), 0.0);
  // The CPU has no peak FLOP/s to measure MFU against: null, never a made-up figure.
  ASSERT_TRUE(start.contains("peak_flops"));
  EXPECT_TRUE(start["peak_flops"].is_null()) << start["peak_flops"];
  EXPECT_EQ(start["peak_flops_format"], "fp32");
  EXPECT_EQ(start["config"]["training"]["steps"], 12);
  EXPECT_EQ(recs.back()["event"], "end");
  EXPECT_EQ(recs.back()["status"], "completed");

  const auto steps = events(recs, "");
  std::vector<int64_t> logged;
  for (const auto& s : steps) {
    for (const char* k : {"step", "tokens", "loss", "lr", "grad_norm", "step_ms", "tokens_per_s"})
      ASSERT_TRUE(s.contains(k)) << k << " in " << s.dump();
    EXPECT_TRUE(std::isfinite(s["loss"].get<double>()));
    EXPECT_GT(s["tokens_per_s"].get<double>(), 0.0);
    EXPECT_EQ(s["tokens"].get<int64_t>(), s["step"].get<int64_t>() * 8 * 64);
    ASSERT_TRUE(s.contains("mfu"));
    EXPECT_TRUE(s["mfu"].is_null()) << s.dump();
    // The CPU backend's count is exact and its ledger too: the memory the start record predicts.
    EXPECT_EQ(s["memory_bytes"].get<double>(), start["memory"]["total"].get<double>());
    EXPECT_EQ(s["peak_memory_bytes"].get<double>(), start["memory"]["total"].get<double>());
    EXPECT_FALSE(s.contains("device_memory_bytes")) << "only on a GPU";
    logged.push_back(s["step"]);
  }
  // Once, after the first step: the measured peak against the prediction.
  const auto mem = events(recs, "memory");
  ASSERT_EQ(mem.size(), 1u);
  EXPECT_EQ(mem[0]["step"], 1);
  EXPECT_EQ(mem[0]["predicted_bytes"].get<double>(), start["memory"]["total"].get<double>());
  EXPECT_EQ(mem[0]["memory_vs_plan"].get<double>(), 1.0);
  EXPECT_EQ(r.out.find("exceeds the predicted"), std::string::npos) << r.out;
  EXPECT_EQ(logged, (std::vector<int64_t>{1, 5, 10, 12}));
  std::vector<int64_t> evals;
  for (const auto& e : events(recs, "eval")) evals.push_back(e["step"]);
  EXPECT_EQ(evals, (std::vector<int64_t>{0, 6, 12}));
  // the first loss is that of a model that knows nothing: ln(256) for the byte vocabulary
  EXPECT_NEAR(steps.front()["loss"].get<double>(), std::log(256.0), 0.1);
}

// The built-in default config learns: validation loss ends far below its start and below the
// corpus's byte unigram entropy (what a model that ignores context could reach). Every other
// precision policy learns the same from the same weights and batches, within issue 3's bands:
// 1% of fp32's validation loss for tf32, fp16 and bf16, 3% for fp8 and bf16-pure (no master
// weights). Each really changes the arithmetic (its loss differs from fp32's).
TEST_F(Cli, EveryPolicyLearnsTheBuiltinCorpusLikeFp32) {
  const std::map<std::string, double> band = {{"fp32", 0.0},  {"tf32", 0.01}, {"fp16", 0.01},
                                              {"bf16", 0.01}, {"bf16-pure", 0.03}, {"fp8", 0.03}};
  std::map<std::string, double> final_val;
  for (const auto& [policy, tolerance] : band) {
    const std::string run_dir = path(policy);
    auto r = run(mpt_bin() + " train " + MPT_SOURCE_DIR + "/configs/default.yaml" +
                 " --set training.steps=200 --set training.eval_every=0 --set checkpoint.every=0"
                 " --set precision=" + policy + " --run-dir " + run_dir);
    ASSERT_EQ(r.code, 0) << r.out;
    const auto recs = read_jsonl(run_dir + "/metrics.jsonl");
    EXPECT_EQ(recs.front()["precision"]["name"], policy);
    const auto evals = events(recs, "eval");
    ASSERT_EQ(evals.size(), 2u);
    const double first = evals.front()["val_loss"], last = evals.back()["val_loss"];
    EXPECT_NEAR(first, std::log(256.0), 0.1) << policy;
    ASSERT_TRUE(std::isfinite(last)) << policy;
    final_val[policy] = last;
  }
  const auto& val = mpt::data::builtin_corpus_tokens(mpt::data::Split::val);
  std::map<uint16_t, double> counts;
  for (uint16_t t : val) counts[t] += 1;
  double unigram = 0;
  for (const auto& [tok, c] : counts) unigram -= c / val.size() * std::log(c / val.size());
  std::printf("val_loss after 200 steps (unigram entropy %.3f nats):\n", unigram);
  for (const auto& [policy, v] : final_val)
    std::printf("  %-9s %.4f (%+.2f%% vs fp32)\n", policy.c_str(), v,
                100.0 * (v - final_val["fp32"]) / final_val["fp32"]);
  EXPECT_LT(final_val["fp32"], unigram - 0.5);
  for (const auto& [policy, tolerance] : band) {
    if (policy == "fp32") continue;
    EXPECT_NEAR(final_val[policy], final_val["fp32"], tolerance * final_val["fp32"]) << policy;
    EXPECT_NE(final_val[policy], final_val["fp32"]) << policy << " computes exactly like fp32";
  }
}

TEST_F(Cli, SameConfigGivesIdenticalMetrics) {
  std::vector<std::vector<json>> runs;
  for (const char* name : {"a", "b"}) {
    auto r = run(mpt_bin() + " train " + MPT_SOURCE_DIR + "/configs/default.yaml" + kTiny +
                 " --set training.steps=15 --set training.log_every=1 --set training.eval_every=5"
                 " --set training.grad_accum=2 --run-dir " + path(name));
    ASSERT_EQ(r.code, 0) << r.out;
    runs.push_back(without_timing(read_jsonl(path(name) + "/metrics.jsonl")));
  }
  ASSERT_EQ(runs[0].size(), runs[1].size());
  EXPECT_EQ(events(runs[0], "").size(), 15u);
  for (size_t i = 0; i < runs[0].size(); ++i) EXPECT_EQ(runs[0][i], runs[1][i]) << "record " << i;
  // and a different data seed gives a different run
  auto r = run(mpt_bin() + " train " + MPT_SOURCE_DIR + "/configs/default.yaml" + kTiny +
               " --set training.steps=3 --set training.log_every=1 --set training.seed=7"
               " --run-dir " + path("c"));
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(events(read_jsonl(path("c") + "/metrics.jsonl"), "")[1]["loss"],
            events(runs[0], "")[1]["loss"]);
}

TEST_F(Cli, PrepareInspectAndTrainOnShards) {
  const std::string text = mpt::data::builtin_corpus_text(mpt::data::Split::train, 120000);
  const std::string in = write("input.txt", text);
  auto r = run(mpt_bin() + " data prepare --input " + in + " --out " + path("shards") +
               " --val-fraction 0.2 --shard-tokens 50000");
  ASSERT_EQ(r.code, 0) << r.out;
  ASSERT_TRUE(fs::exists(path("shards/train_000000.bin"))) << r.out;
  ASSERT_TRUE(fs::exists(path("shards/val_000000.bin"))) << r.out;

  r = run(mpt_bin() + " data inspect " + path("shards/val_000000.bin"));
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("20240520"), std::string::npos) << r.out;
  const auto info = mpt::data::inspect_shard(path("shards/val_000000.bin"));
  EXPECT_NE(r.out.find(std::to_string(info.num_tokens)), std::string::npos) << r.out;
  // A bad shard among good ones: each is reported, the good one still shown, exit 2.
  r = run(mpt_bin() + " data inspect " + write("bad.bin", "junk") + " " +
          path("shards/val_000000.bin") + " " + path("missing.bin"));
  EXPECT_EQ(r.code, 2) << r.out;
  for (const std::string& want : {path("bad.bin") + ": file has 4 bytes",
                                  "path:        " + path("shards/val_000000.bin"),
                                  path("missing.bin") + ": cannot open"})
    EXPECT_NE(r.out.find(want), std::string::npos) << want << " in: " << r.out;

  r = run(mpt_bin() + " train " + MPT_SOURCE_DIR + "/configs/default.yaml" + kTiny +
          " --set 'data.train=[\"" + path("shards") + "/train_*.bin\"]' --set data.val=" +
          path("shards/val_000000.bin") + " --set training.steps=5 --run-dir " + path("run"));
  ASSERT_EQ(r.code, 0) << r.out;
  const auto start = read_jsonl(path("run/metrics.jsonl")).front();
  EXPECT_NE(start["train_data"].get<std::string>().find("shard"), std::string::npos)
      << start.dump();
}

TEST_F(Cli, RunDirectoryThatHoldsARunIsNotReused) {
  write("keep.txt", "precious");
  auto r = run(mpt_bin() + " train " + MPT_SOURCE_DIR + "/configs/default.yaml" + kTiny +
               " --set training.steps=2 --run-dir " + dir_.string());
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find(dir_.string()), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("is not empty (it holds other files, not a run)"), std::string::npos)
      << r.out;
  EXPECT_FALSE(fs::exists(path("metrics.jsonl")));
  // One that holds a run says so; and a place where no directory can be made is bad input too.
  r = run(mpt_bin() + " train " + MPT_SOURCE_DIR + "/configs/default.yaml" + kTiny +
          " --set training.steps=2 --run-dir " + path("first"));
  ASSERT_EQ(r.code, 0) << r.out;
  r = run(mpt_bin() + " train " + MPT_SOURCE_DIR + "/configs/default.yaml" + kTiny +
          " --set training.steps=2 --run-dir " + path("first"));
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("already holds a run"), std::string::npos) << r.out;
  r = run(mpt_bin() + " train " + MPT_SOURCE_DIR + "/configs/default.yaml" + kTiny +
          " --set training.steps=2 --run-dir " + path("keep.txt") + "/run");
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("cannot create run directory"), std::string::npos) << r.out;
}

TEST_F(Cli, DivergenceIsARuntimeFailure) {
  auto r = run(mpt_bin() + " train " + MPT_SOURCE_DIR + "/configs/default.yaml" + kTiny +
               " --set training.steps=30 --set optimizer.lr=1e30 --set schedule.warmup_steps=0"
               " --set schedule.min_lr=0 --set optimizer.grad_clip=0 --run-dir " + path("run"));
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.out.find("diverged"), std::string::npos) << r.out;
  const auto recs = read_jsonl(path("run/metrics.jsonl"));
  EXPECT_EQ(recs.back()["event"], "end");
  EXPECT_EQ(recs.back()["status"], "failed");
}

// Bad configs: exit 2, the message names the key (and where it is), no run directory.
TEST_F(Cli, BadConfigsExitTwoWithoutRunDirectory) {
  struct Case {
    std::string name, yaml, sets;
    std::vector<std::string> expect;
  };
  const std::vector<Case> cases = {
      {"unknown key", "model:\n  n_layers: 2\n", "", {"model.n_layers", "n_layer", ":2:"}},
      {"unknown section", "modle:\n  n_layer: 2\n", "", {"modle", "model"}},
      {"wrong type", "training:\n  steps: many\n", "", {"training.steps", "many", ":2:"}},
      {"width not divisible by heads", "model:\n  n_embd: 30\n  n_head: 4\n", "",
       {"n_embd", "n_head"}},
      {"seq_len above the model's", "model:\n  max_seq_len: 16\ntraining:\n  seq_len: 32\n", "",
       {"training.seq_len", "max_seq_len"}},
      {"missing shard", "data:\n  train: [no/such/shard_*.bin]\n", "",
       {"data.train", "no/such/shard_*.bin"}},
      {"unknown precision", "precision: fp7\n", "", {"precision", "fp32"}},
      {"unavailable backend", "backend: cuda\n", "", {"cuda", "not available"}},
      {"broken YAML", "model: [1, 2\n", "", {"bad.yaml"}},
      {"bad override", "", "--set training.micro_batch=0", {"--set", "training.micro_batch"}},
      {"unknown override", "", "--set optimizer.learning_rate=1", {"optimizer.learning_rate", "lr"}},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string cfg = write("bad.yaml", c.yaml);
    const std::string run_dir = path("run");
    auto r = run(mpt_bin() + " train " + cfg + " " + c.sets + " --run-dir " + run_dir);
    EXPECT_EQ(r.code, 2) << r.out;
    for (const auto& e : c.expect) EXPECT_NE(r.out.find(e), std::string::npos) << e << " in: " << r.out;
    EXPECT_FALSE(fs::exists(run_dir));
  }
}

// A misspelt MPT_FP8_PRODUCERS (read from the environment, as the CUDA backend's options are):
// exit 2 naming it and the value, before any run directory.
TEST_F(Cli, BadFp8ProducersSettingExitsTwoWithoutRunDirectory) {
  const std::string cfg = write("ok.yaml", "");
  const std::string run_dir = path("run");
  auto r = run("MPT_FP8_PRODUCERS=off " + mpt_bin() + " train " + cfg +
               " --set training.steps=1 --run-dir " + run_dir);
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("MPT_FP8_PRODUCERS"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("'off'"), std::string::npos) << r.out;
  EXPECT_FALSE(fs::exists(run_dir));
}

// Bad shards: exit 2, the message names the file, no run directory.
TEST_F(Cli, BadShardsExitTwoWithoutRunDirectory) {
  auto header = [](int32_t magic, int32_t version, int32_t count) {
    std::string h(mpt::data::kShardHeaderBytes, '\0');
    std::memcpy(&h[0], &magic, 4);
    std::memcpy(&h[4], &version, 4);
    std::memcpy(&h[8], &count, 4);
    return h;
  };
  auto tokens = [](int n, uint16_t value) { return std::string(2 * n, '\0').replace(0, 2, std::string(reinterpret_cast<const char*>(&value), 2)); };
  struct Case {
    std::string name, bytes;
    std::vector<std::string> expect;
  };
  const std::vector<Case> cases = {
      {"bad magic", header(12345, 1, 4000) + tokens(4000, 1), {"magic"}},
      {"bad version", header(20240520, 7, 4000) + tokens(4000, 1), {"version"}},
      {"truncated", header(20240520, 1, 4000) + tokens(3000, 1), {"bytes"}},
      {"short header", std::string(100, 'x'), {"header"}},
      {"token above vocab", header(20240520, 1, 4000) + tokens(4000, 300), {"300", "vocab"}},
      {"too few tokens", header(20240520, 1, 10) + tokens(10, 1), {"tokens"}},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string shard = write("bad_shard.bin", c.bytes);
    for (const char* split : {"train", "val"}) {
      const std::string run_dir = path("run");
      auto r = run(mpt_bin() + " train " + MPT_SOURCE_DIR + "/configs/default.yaml" + kTiny +
                   " --set data." + split + "=" + shard + " --run-dir " + run_dir);
      EXPECT_EQ(r.code, 2) << split << ": " << r.out;
      EXPECT_NE(r.out.find(shard), std::string::npos) << split << ": " << r.out;
      for (const auto& e : c.expect)
        EXPECT_NE(r.out.find(e), std::string::npos) << e << " in: " << r.out;
      EXPECT_FALSE(fs::exists(run_dir));
    }
    auto r = run(mpt_bin() + " data inspect " + shard);
    if (c.name != "token above vocab" && c.name != "too few tokens") {
      EXPECT_EQ(r.code, 2) << r.out;
      EXPECT_NE(r.out.find(shard), std::string::npos) << r.out;
    }
  }
}

// Without a config file `mpt train` trains the built-in default; output goes to
// output.dir/<"default">-<UTC time>.
TEST_F(Cli, TrainWithoutConfigUsesBuiltinDefault) {
  auto r = run("cd " + dir_.string() + " && " + mpt_bin() + " train" + kTiny +
               " --set training.steps=2 --set output.dir=out");
  ASSERT_EQ(r.code, 0) << r.out;
  std::vector<fs::path> runs;
  for (const auto& e : fs::directory_iterator(dir_ / "out")) runs.push_back(e.path());
  ASSERT_EQ(runs.size(), 1u);
  EXPECT_EQ(runs[0].filename().string().rfind("default-", 0), 0u) << runs[0];
  EXPECT_TRUE(fs::exists(runs[0] / "config.yaml"));
  EXPECT_EQ(read_jsonl((runs[0] / "metrics.jsonl").string()).back()["status"], "completed");
}

// A config whose model cannot fit in memory is refused before anything is allocated or written,
// naming the keys to change; so are out-of-range sizes that would overflow.
TEST_F(Cli, OversizedConfigsExitTwoWithoutRunDirectory) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"--set model.max_seq_len=2000000000", "model.max_seq_len"},
      {"--set model.n_embd=65536 --set model.n_layer=64", "model.n_embd"},
      {"--set training.micro_batch=3000 --set model.n_embd=1024", "training.micro_batch"},
      {"--set model.vocab_pad_multiple=2147483647", "model.vocab_pad_multiple"},
      {"--set threads=100000", "threads"},
  };
  for (const auto& [sets, key] : cases) {
    SCOPED_TRACE(sets);
    auto r = run(mpt_bin() + " train " + MPT_SOURCE_DIR + "/configs/default.yaml " + sets +
                 " --run-dir " + path("run"));
    EXPECT_EQ(r.code, 2) << r.out;
    EXPECT_NE(r.out.find(key), std::string::npos) << r.out;
    EXPECT_FALSE(fs::exists(path("run")));
  }
}

// Two runs started at once with the same run directory: exactly one gets it.
TEST_F(Cli, RacingRunsNeverShareADirectory) {
  const std::string cmd = mpt_bin() + " train " + MPT_SOURCE_DIR + "/configs/default.yaml" + kTiny +
                          " --set training.steps=3 --run-dir " + path("run");
  auto r = run("(" + cmd + " >/dev/null 2>&1; echo a=$?) & (" + cmd +
               " >/dev/null 2>&1; echo b=$?); wait");
  const bool a_ok = r.out.find("a=0") != std::string::npos;
  const bool b_ok = r.out.find("b=0") != std::string::npos;
  EXPECT_NE(a_ok, b_ok) << r.out;
  EXPECT_TRUE(r.out.find("a=2") != std::string::npos || r.out.find("b=2") != std::string::npos)
      << r.out;
  const auto recs = read_jsonl(path("run/metrics.jsonl"));
  ASSERT_FALSE(recs.empty());
  EXPECT_EQ(events(recs, "start").size(), 1u);
  EXPECT_EQ(recs.back()["status"], "completed");
}

// --dry-run validates everything and prints the plan, the predicted memory ledger included, but
// creates nothing; bad input still fails with exit 2.
TEST_F(Cli, DryRunPrintsThePlanAndCreatesNothing) {
  auto r = run(mpt_bin() + " train " + MPT_SOURCE_DIR + "/configs/default.yaml --dry-run" +
               " --run-dir " + path("run"));
  ASSERT_EQ(r.code, 0) << r.out;
  for (const char* want : {"config OK", "parameters", "834304", "master weights", "optimizer state",
                           "activations", "total", "builtin corpus"})
    EXPECT_NE(r.out.find(want), std::string::npos) << want << " in: " << r.out;
  EXPECT_FALSE(fs::exists(path("run")));
  r = run(mpt_bin() + " train " + MPT_SOURCE_DIR + "/configs/default.yaml --dry-run" +
          " --set data.train=" + path("missing.bin") + " --run-dir " + path("run"));
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_FALSE(fs::exists(path("run")));
}

// configs/gpt2-124m.yaml builds GPT-2 small: 124,439,808 parameters, as published.
TEST_F(Cli, Gpt2SmallConfigHasGpt2ParameterCount) {
  // Micro-batch 1: the count does not depend on it, and the dry run's memory check must pass on
  // any test machine (the config's micro-batch 16 needs ~15 GiB on the CPU).
  auto r = run(mpt_bin() + " train " + MPT_SOURCE_DIR + "/configs/gpt2-124m.yaml --dry-run" +
               " --set data.train=builtin --set data.val=builtin --set training.micro_batch=1" +
               " --run-dir " + path("run"));
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("parameters      124439808"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("vocab 50257 (padded 50304)"), std::string::npos) << r.out;
  // Without its FineWeb shards the config is refused, naming the missing pattern.
  r = run("cd " + dir_.string() + " && " + mpt_bin() + " train " + MPT_SOURCE_DIR +
          "/configs/gpt2-124m.yaml --dry-run");
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("fineweb_train_*.bin"), std::string::npos) << r.out;
}

// A run larger than the memory its backend has is refused before anything is allocated or
// written (here the machine's memory: the CPU backend), naming the keys that shrink it; a dry
// run too, after showing the ledger. 96 layers of GPT-2 small at 128 x 1024 tokens: over
// 600 GiB, more than any test machine has. The ledger's heading names training.recompute.
TEST_F(Cli, RunLargerThanTheMachineIsRefusedBeforeAllocating) {
  const std::string too_big = mpt_bin() + " train " + MPT_SOURCE_DIR +
                              "/configs/gpt2-124m.yaml --set backend=cpu --set data.train=builtin" +
                              " --set data.val=builtin --set training.micro_batch=128" +
                              " --set model.n_layer=96 --run-dir " + path("run");
  for (const char* dry : {"", " --dry-run"}) {
    SCOPED_TRACE(dry);
    const auto r = run(too_big + dry);
    EXPECT_EQ(r.code, 2) << r.out;
    // The machine's memory, or a cgroup's limit where the test runs under one.
    const bool machine = r.out.find("but the machine allows") != std::string::npos,
               limit = r.out.find("but this process's memory limit (") != std::string::npos;
    EXPECT_TRUE(machine || limit) << r.out;
    EXPECT_NE(r.out.find("training.micro_batch"), std::string::npos) << r.out;
    EXPECT_FALSE(fs::exists(path("run")));
    if (*dry) {  // the ledger that says why, before the refusal
      EXPECT_NE(r.out.find("memory (predicted, cpu):"), std::string::npos) << r.out;
    }
  }
  // training.recompute: the heading says in how many blocks (fp8 blocks keep neither anyway).
  for (const auto& [set, want] : std::vector<std::pair<std::string, std::string>>{
           {"", "training.recompute gelu in 4 of 4 blocks"},
           {" --set precision=fp8 --set fp8.first_last_blocks=bf16",
            "training.recompute gelu in 2 of 4 blocks"},
           {" --set precision=fp8", "training.recompute gelu in no block: all are in fp8"}}) {
    const auto r = run(mpt_bin() + " train --dry-run --set model.n_layer=4 --set threads=1"
                       " --set training.recompute=gelu" + set);
    EXPECT_EQ(r.code, 0) << r.out;
    EXPECT_NE(r.out.find("memory (predicted, cpu, " + want + "):"), std::string::npos) << r.out;
  }
}

// --run-dir given but empty (an unset shell variable) or not UTF-8 (records are JSON): exit 2,
// nothing created.
TEST_F(Cli, EmptyOrNonUtf8RunDirIsRefused) {
  const std::string train = mpt_bin() + " train " + MPT_SOURCE_DIR +
                            "/configs/default.yaml --set training.steps=2 --set output.dir=" +
                            path("out");
  auto r = run(train + " --run-dir ''");
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("--run-dir: empty"), std::string::npos) << r.out;
  r = run(train + " --run-dir \"$(printf '" + path("caf") + "\\351')\"");  // sh's printf: octal
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("not valid UTF-8"), std::string::npos) << r.out;
  EXPECT_FALSE(fs::exists(path("out")));
  EXPECT_FALSE(fs::exists(path("caf") + "\xe9"));
  r = run(train + " --run-dir " + path("r") + " --resume ''");  // not the latest checkpoint
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("--resume: an empty checkpoint path"), std::string::npos) << r.out;
}

// Each --set takes one override, so options and the config file can come in any order.
TEST_F(Cli, OverridesAndConfigInAnyOrder) {
  auto r = run(mpt_bin() + " train --set training.steps=7 " + MPT_SOURCE_DIR +
               "/configs/default.yaml --set training.grad_accum=2 --dry-run");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("config OK: " + std::string(MPT_SOURCE_DIR) + "/configs/default.yaml"),
            std::string::npos) << r.out;
  EXPECT_NE(r.out.find("x 2 accumulation x 1 process(es) = 1024 tokens/step, 7 steps"), std::string::npos) << r.out;
}
