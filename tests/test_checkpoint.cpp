// Checkpoints through the `mpt` executable: exact resume, crash safety at every point of a
// save, full disks, corrupted files, config compatibility, stop signals, retention, inspect.
#include <gtest/gtest.h>

#include <sys/stat.h>
#include <xxhash.h>

#include <cstdio>
#include <filesystem>
#include <functional>
#include <map>
#include <fstream>

#include "cli_util.h"
#include "data/corpus.h"

using namespace mpt::test;

namespace {

class Checkpoints : public CliTest {
 protected:
  // Small shards, so that a run crosses shard boundaries (and the data cursor must too).
  void SetUp() override {
    CliTest::SetUp();
    write("text.txt", mpt::data::builtin_corpus_text(mpt::data::Split::train, 40000));
    auto r = run(mpt_bin() + " data prepare --input " + path("text.txt") + " --out " +
                 path("shards") + " --val-fraction 0.25 --shard-tokens 3000");
    ASSERT_EQ(r.code, 0) << r.out;
  }
  // The tiny model on the shards; 16 steps of 2 x 4 x 32 tokens cross several shards.
  std::string train_cmd(const std::string& run_dir, const std::string& extra = "") const {
    return mpt_bin() + " train " + MPT_SOURCE_DIR + "/configs/default.yaml" + kTiny +
           " --set training.grad_accum=2 --set training.steps=16 --set training.log_every=2"
           " --set training.eval_every=4 --set checkpoint.every=4 --set checkpoint.keep_last=3"
           " --set 'data.train=[\"" + path("shards") + "/train_*.bin\"]'"
           " --set 'data.val=[\"" + path("shards") + "/val_*.bin\"]'" +
           (run_dir.empty() ? "" : " --run-dir " + run_dir) + " " + extra;
  }
  std::string ckpt(const std::string& run, int step) const {
    return checkpoint_dir(path(run), step);
  }
  // The reference: 16 straight steps.
  void straight() {
    auto r = run(train_cmd(path("straight")));
    ASSERT_EQ(r.code, 0) << r.out;
  }
  // The final weights and optimizer state equal the straight run's byte for byte; so does
  // state.json when the two runs' configs are the same.
  void expect_same_final_checkpoint(const std::string& run_name, bool same_config = true,
                                    const std::string& reference = "straight") {
    std::vector<std::string> files = {"model.safetensors", "optimizer.safetensors"};
    if (same_config) files.push_back("state.json");
    for (const auto& f : files)
      EXPECT_TRUE(slurp(ckpt(reference, 16) + "/" + f) == slurp(ckpt(run_name, 16) + "/" + f))
          << f << " differs from the straight run's";
  }
};

std::vector<json> steps_and_evals(const std::vector<json>& recs) {
  std::vector<json> out;
  for (const auto& r : without_timing(recs))
    if (!r.contains("event") || r["event"] == "eval") out.push_back(r);
  return out;
}

}  // namespace

// N steps, stop, resume, N more: the same records and the same bytes as 2N straight steps.
TEST_F(Checkpoints, ResumeContinuesExactly) {
  straight();
  auto r = run("MPT_FAULT=preempt_at_step=13 " + train_cmd(path("split")));
  ASSERT_EQ(r.code, 3) << r.out;  // stopped after saving
  ASSERT_TRUE(fs::exists(ckpt("split", 13) + "/state.json"));  // past a shard boundary
  r = run(train_cmd(path("split"), "--resume"));
  ASSERT_EQ(r.code, 0) << r.out;
  const auto a = read_jsonl(path("straight/metrics.jsonl"));
  const auto b = read_jsonl(path("split/metrics.jsonl"));
  EXPECT_EQ(steps_and_evals(a), steps_and_evals(b));
  EXPECT_EQ(events(b, "start").size(), 2u);
  EXPECT_EQ(events(b, "start")[1]["resume_step"], 13);
  expect_same_final_checkpoint("split");
  // and from an explicit checkpoint path, into another run directory
  r = run(mpt_bin() + " train " + MPT_SOURCE_DIR + "/configs/default.yaml" + kTiny +
          " --set training.grad_accum=2 --set training.steps=16 --set training.log_every=2"
          " --set training.eval_every=4 --set checkpoint.every=4 --set checkpoint.keep_last=3"
          " --set 'data.train=[\"" + path("shards") + "/train_*.bin\"]'"
          " --set 'data.val=[\"" + path("shards") + "/val_*.bin\"]'"
          " --resume " + ckpt("straight", 8) + " --run-dir " + path("fork"));
  ASSERT_EQ(r.code, 0) << r.out;
  expect_same_final_checkpoint("fork");
}

// The same under each precision policy: their rounding (stochastic for bf16-pure), master
// weights, loss scale and fp8 amax histories continue exactly. Each really is another run than
// fp32.
struct PolicyCase {
  std::string name;      // the test and run name
  std::string policy;    // the preset
  std::string settings;  // further --set options
};

class ResumeUnderPolicy : public Checkpoints, public ::testing::WithParamInterface<PolicyCase> {};

TEST_P(ResumeUnderPolicy, ContinuesExactly) {
  const PolicyCase& c = GetParam();
  // Step records every 3 steps: the stop at step 10 falls between two, so the resumed run's
  // record at 12 must count steps 10 to 12 as the straight run's does (the checkpoint carries
  // the counts since the record at 9).
  const std::string set =
      "--set precision=" + c.policy + " --set training.log_every=3 " + c.settings;
  const std::string straight_run = "straight_" + c.name, split_run = "split_" + c.name;
  auto r = run(train_cmd(path(straight_run), set));
  ASSERT_EQ(r.code, 0) << r.out;
  r = run("MPT_FAULT=preempt_at_step=10 " + train_cmd(path(split_run), set));
  ASSERT_EQ(r.code, 3) << r.out;
  r = run(train_cmd(path(split_run), set + " --resume"));
  ASSERT_EQ(r.code, 0) << r.out;
  const auto a = read_jsonl(path(straight_run + "/metrics.jsonl"));
  EXPECT_EQ(steps_and_evals(a), steps_and_evals(read_jsonl(path(split_run + "/metrics.jsonl"))));
  expect_same_final_checkpoint(split_run, true, straight_run);
  straight();
  EXPECT_NE(slurp(ckpt("straight", 16) + "/model.safetensors"),
            slurp(ckpt(straight_run, 16) + "/model.safetensors"));
  // The checkpoint holds what the policy needs to continue.
  const json state = json::parse(slurp(ckpt(straight_run, 16) + "/state.json"));
  EXPECT_EQ(state["numerics"]["loss_scaler"]["mode"], c.policy == "fp16" ? "dynamic" : "none");
  EXPECT_EQ(state["numerics"]["fp8"].size(), c.policy == "fp8" ? 4u * 2u : 0u);  // 4 GEMMs x 2 layers
  if (c.name == "fp16_skips") {
    // Steps were skipped before the save at step 10, and the saved scale is the backed-off one.
    const json at10 = json::parse(slurp(ckpt(split_run, 10) + "/state.json"));
    EXPECT_GT(at10["numerics"]["loss_scaler"]["skipped_total"].get<int>(), 0);
    EXPECT_LT(at10["numerics"]["loss_scaler"]["skipped_total"].get<int>(), 10);
    EXPECT_LT(at10["numerics"]["loss_scaler"]["scale"].get<double>(), 67108864.0);
  }
  if (c.policy == "fp8") {
    // A non-trivial amax history: one entry per step taken so far.
    const json at10 = json::parse(slurp(ckpt(split_run, 10) + "/state.json"));
    EXPECT_EQ(at10["numerics"]["fp8"][0]["inp"]["amax_history"].size(), 10u) << at10["numerics"]["fp8"][0].dump();
  }
}

INSTANTIATE_TEST_SUITE_P(
    Policies, ResumeUnderPolicy,
    ::testing::Values(PolicyCase{"tf32", "tf32", ""}, PolicyCase{"fp16", "fp16", ""},
                      // 2^26 overflows this model's fp16 gradients: the first few steps are
                      // skipped and the scale backs off before the save at step 10
                      PolicyCase{"fp16_skips", "fp16",
                                 "--set loss_scale.init_scale=67108864"
                                 " --set loss_scale.max_scale=67108864"},
                      PolicyCase{"bf16", "bf16", ""}, PolicyCase{"bf16_pure", "bf16-pure", ""},
                      PolicyCase{"fp8", "fp8", ""},
                      PolicyCase{"fp8_current", "fp8", "--set fp8.recipe=current"}),
    [](const auto& info) { return info.param.name; });

// A stop signal during an evaluation cuts it short (an evaluation can be long): the run saves
// a checkpoint that says the evaluation is pending and exits 3, and the resumed run evaluates
// first, so that its records and weights are the straight run's. Before the first step (the
// evaluation at step 0) the checkpoint is of step 0.
TEST_F(Checkpoints, AStopDuringAnEvaluationResumesWithIt) {
  straight();
  for (int at : {0, 8}) {
    SCOPED_TRACE("stopped in the evaluation at step " + std::to_string(at));
    const std::string name = "eval_stop_" + std::to_string(at);
    auto r = run("MPT_FAULT=stop_in_eval_at_step=" + std::to_string(at) + " " +
                 train_cmd(path(name)));
    ASSERT_EQ(r.code, 3) << r.out;
    EXPECT_NE(r.out.find("cut short by a stop signal"), std::string::npos) << r.out;
    const json state = json::parse(slurp(ckpt(name, at) + "/state.json"));
    EXPECT_EQ(state["eval_pending"], true);
    EXPECT_TRUE(events(read_jsonl(path(name + "/metrics.jsonl")), "eval").size() == (at ? 2u : 0u))
        << "no record of the evaluation that was cut short";
    if (at > 0) {
      // training.steps lowered to the checkpoint's step: nothing to train, and the message says
      // what happens to the pending evaluation once training continues.
      r = run(train_cmd(path(name), "--set training.steps=" + std::to_string(at) + " --resume"));
      EXPECT_EQ(r.code, 2) << r.out;
      EXPECT_NE(r.out.find("the evaluation a stop cut short at that step runs first"),
                std::string::npos)
          << r.out;
    }
    r = run(train_cmd(path(name), "--resume"));
    ASSERT_EQ(r.code, 0) << r.out;
    EXPECT_EQ(steps_and_evals(read_jsonl(path("straight/metrics.jsonl"))),
              steps_and_evals(read_jsonl(path(name + "/metrics.jsonl"))));
    expect_same_final_checkpoint(name);
  }
}

// A crash at any point of a save leaves the previous committed checkpoint loadable, and the
// resumed run ends exactly where an uninterrupted one does.
TEST_F(Checkpoints, CrashAtAnyPointOfASaveIsRecoverable) {
  straight();
  for (const char* point : {"in_file", "before_rename", "in_latest", "in_delete"}) {
    SCOPED_TRACE(point);
    const std::string name = std::string("crash_") + point;
    // keep_last=1 so that the save of step 8 deletes step 4 (the in_delete point).
    auto r = run(std::string("MPT_FAULT=crash=") + point + ",crash_step=8 " +
                 train_cmd(path(name), "--set checkpoint.keep_last=1"));
    ASSERT_EQ(r.code, 86) << r.out;  // the injected crash
    const std::string latest = slurp(path(name + "/checkpoints/latest"));
    const bool committed = std::string(point) == "in_delete";
    EXPECT_EQ(latest, committed ? "step_00000008\n" : "step_00000004\n");
    r = run(mpt_bin() + " inspect " + path(name + "/checkpoints/") + latest.substr(0, 13));
    EXPECT_EQ(r.code, 0) << r.out;
    r = run(train_cmd(path(name), "--set checkpoint.keep_last=1 --resume"));
    ASSERT_EQ(r.code, 0) << r.out;
    EXPECT_NE(r.out.find(committed ? "at step 8" : "at step 4"), std::string::npos) << r.out;
    expect_same_final_checkpoint(name, /*same_config=*/false);  // keep_last differs
    // nothing half-written is left behind
    for (const auto& e : fs::directory_iterator(path(name + "/checkpoints")))
      EXPECT_EQ(e.path().filename().string().find(".tmp"), std::string::npos) << e.path();
  }
}

TEST_F(Checkpoints, FullDiskFailsTheRunAndKeepsThePreviousCheckpoint) {
  auto r = run("MPT_FAULT=enospc_after=0 " + train_cmd(path("full")));
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.out.find("No space left on device"), std::string::npos) << r.out;
  EXPECT_FALSE(fs::exists(path("full/checkpoints/latest")));
  EXPECT_EQ(read_jsonl(path("full/metrics.jsonl")).back()["status"], "failed");

  // Room for one checkpoint but not two: step 4 survives and the run resumes from it.
  straight();
  uintmax_t one = 0;
  for (const auto& e : fs::directory_iterator(ckpt("straight", 16))) one += fs::file_size(e.path());
  r = run("MPT_FAULT=enospc_after=" + std::to_string(one + 64) + " " + train_cmd(path("half")));
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_EQ(slurp(path("half/checkpoints/latest")), "step_00000004\n");
  EXPECT_FALSE(fs::exists(ckpt("half", 8)));
  r = run(train_cmd(path("half"), "--resume"));
  ASSERT_EQ(r.code, 0) << r.out;
  expect_same_final_checkpoint("half");
}

// Corruption is reported naming the file, never a silent fresh start, and the message names
// the newest earlier checkpoint that does verify.
TEST_F(Checkpoints, CorruptionIsNamedWithTheNewestGoodCheckpoint) {
  straight();
  auto flip = [](const std::string& p, size_t at) {
    std::fstream f(p, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(static_cast<std::streamoff>(at));
    char c;
    f.get(c);
    f.seekp(static_cast<std::streamoff>(at));
    f.put(static_cast<char>(c ^ 0x10));
  };
  struct Case {
    std::string name, bad_file;
    std::function<void(const std::string& ckpt_dir, const std::string& run_dir)> damage;
  };
  const std::vector<Case> cases = {
      {"bit flip in the weights", "model.safetensors",
       [&](const std::string& c, const std::string&) { flip(c + "/model.safetensors", 5000); }},
      {"truncated optimizer state", "optimizer.safetensors",
       [](const std::string& c, const std::string&) {
         fs::resize_file(c + "/optimizer.safetensors", 1000);
       }},
      {"missing file", "model.safetensors",
       [](const std::string& c, const std::string&) { fs::remove(c + "/model.safetensors"); }},
      {"edited state", "state.json",
       [&](const std::string& c, const std::string&) {
         std::string s = slurp(c + "/state.json");
         s.replace(s.find("\"step\": 16"), 10, "\"step\": 15");
         std::ofstream(c + "/state.json", std::ios::binary) << s;
       }},
      {"garbage latest", "latest",
       [](const std::string&, const std::string& run) {
         std::ofstream(run + "/checkpoints/latest") << "hello";
       }},
      {"empty latest", "latest",
       [](const std::string&, const std::string& run) {
         std::ofstream(run + "/checkpoints/latest") << "";
       }},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    fs::remove_all(path("copy"));
    fs::copy(path("straight"), path("copy"), fs::copy_options::recursive);
    c.damage(ckpt("copy", 16), path("copy"));
    auto r = run(train_cmd(path("copy"), "--set training.steps=20 --resume"));
    EXPECT_EQ(r.code, 2) << r.out;
    EXPECT_NE(r.out.find(c.bad_file), std::string::npos) << r.out;
    // The latest is broken (or unreadable): the newest earlier good one is named.
    const std::string good = c.bad_file == "latest" ? ckpt("copy", 16) : ckpt("copy", 12);
    EXPECT_NE(r.out.find("verifies is " + good), std::string::npos) << r.out;
    if (c.bad_file != "latest") {
      r = run(mpt_bin() + " inspect " + ckpt("copy", 16));
      EXPECT_EQ(r.code, 2) << r.out;
      EXPECT_NE(r.out.find(c.bad_file), std::string::npos) << r.out;
    }
    // nothing was trained or written
    EXPECT_EQ(read_jsonl(path("copy/metrics.jsonl")).size(),
              read_jsonl(path("straight/metrics.jsonl")).size());
  }
}

// What a checksum cannot catch: a state.json re-signed after an edit (as a hand edit, or a
// tool, would leave it), files that are not regular, directories that are not committed
// checkpoints. Each is refused with exit 2, naming what is wrong, quickly (a FIFO is not opened),
// and nothing of the run changes.
TEST_F(Checkpoints, NonsenseAndOddFilesAreRefusedNotFollowed) {
  straight();
  const std::string config_before = slurp(path("straight/config.yaml"));
  auto resign = [](nlohmann::json j) {  // state.json's checksum, as load_checkpoint checks it
    j.erase("state_checksum");
    const std::string text = j.dump();
    char hex[17];
    std::snprintf(hex, sizeof hex, "%016llx",
                  static_cast<unsigned long long>(XXH3_64bits(text.data(), text.size())));
    return std::string(hex);
  };
  struct Edit {
    std::string name, expect;
    std::function<void(json&)> edit;
  };
  const std::vector<Edit> edits = {
      {"negative step", "step -5 is not a whole number >= 0", [](json& j) { j["step"] = -5; }},
      {"fractional step", "step 16.5 is not a whole number", [](json& j) { j["step"] = 16.5; }},
      {"negative epoch", "data.epoch -1 is not a whole number",
       [](json& j) { j["data"]["epoch"] = -1; }},
      {"negative sample", "data.sample -5 is not a whole number",
       [](json& j) { j["data"]["sample"] = -5; }},
      {"tokens a string", "tokens \"8\" is not a whole number",
       [](json& j) { j["tokens"] = "8"; }},
      {"step not the directory's", "step 17 in a directory named step_00000016",
       [](json& j) { j["step"] = 17; }},
      {"optimizer ahead of the step", "optimizer step", [](json& j) { j["optimizer_step"] = 99; }},
      {"world size a string", "world_size \"1\" is not a positive integer",
       [](json& j) { j["world_size"] = "1"; }},
      {"version a number", "mpt_version 5 is not a string", [](json& j) { j["mpt_version"] = 5; }},
  };
  for (const auto& e : edits) {
    SCOPED_TRACE(e.name);
    fs::remove_all(path("copy"));
    fs::copy(path("straight"), path("copy"), fs::copy_options::recursive);
    const std::string state = ckpt("copy", 16) + "/state.json";
    json j = json::parse(slurp(state));
    e.edit(j);
    j["state_checksum"] = resign(j);
    std::ofstream(state, std::ios::binary) << j.dump(1);
    auto r = run(mpt_bin() + " inspect " + ckpt("copy", 16));
    EXPECT_EQ(r.code, 2) << r.out;
    EXPECT_NE(r.out.find("state.json: "), std::string::npos) << r.out;
    EXPECT_NE(r.out.find(e.expect), std::string::npos) << r.out;
    r = run(train_cmd(path("copy"), "--set training.steps=20 --resume"));
    EXPECT_EQ(r.code, 2) << r.out;
    EXPECT_NE(r.out.find(e.expect), std::string::npos) << r.out;
  }
  // Not regular files: a FIFO would block in open(), a directory reads as an I/O error.
  fs::remove_all(path("copy"));
  fs::copy(path("straight"), path("copy"), fs::copy_options::recursive);
  fs::remove(path("copy/checkpoints/latest"));
  ASSERT_EQ(::mkfifo(path("copy/checkpoints/latest").c_str(), 0644), 0);
  auto r = run("timeout 20 " + train_cmd(path("copy"), "--set training.steps=20 --resume"));
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("latest: not a regular file"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("verifies is " + ckpt("copy", 16)), std::string::npos) << r.out;
  // A step directory without its state.json (a deletion cut short): damaged, not "no checkpoint".
  fs::remove(ckpt("copy", 12) + "/state.json");
  r = run(mpt_bin() + " inspect " + ckpt("copy", 12));
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("incomplete or damaged"), std::string::npos) << r.out;
  fs::remove(ckpt("copy", 16) + "/state.json");
  fs::create_directory(ckpt("copy", 16) + "/state.json");
  r = run("timeout 20 " + mpt_bin() + " inspect " + ckpt("copy", 16));
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("state.json: not a regular file"), std::string::npos) << r.out;
  // A run directory, or its checkpoints/, where a checkpoint is wanted: told where they are.
  for (const std::string& where : {path("straight"), path("straight/checkpoints/")}) {
    r = run(mpt_bin() + " inspect " + where);
    EXPECT_EQ(r.code, 2) << r.out;
    EXPECT_NE(r.out.find("a run's directory, not a checkpoint"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("checkpoints/latest"), std::string::npos) << r.out;
  }
  // A save cut off before its rename, and a renamed copy beside the run's checkpoints: neither
  // continues the run in place (before, the second failed an internal check after config.yaml
  // had been rewritten).
  fs::copy(ckpt("straight", 16), path("straight/checkpoints/.tmp-step_00000016"),
           fs::copy_options::recursive);
  r = run(mpt_bin() + " inspect " + path("straight/checkpoints/.tmp-step_00000016"));
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("an uncommitted checkpoint"), std::string::npos) << r.out;
  r = run(train_cmd("", "--set training.steps=20 --resume " +
                            path("straight/checkpoints/.tmp-step_00000016")));
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("an uncommitted checkpoint"), std::string::npos) << r.out;
  fs::rename(path("straight/checkpoints/.tmp-step_00000016"), path("straight/checkpoints/backup16"));
  r = run(train_cmd("", "--set training.steps=20 --resume " +
                            path("straight/checkpoints/backup16")));
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("named step_NNNNNNNN"), std::string::npos) << r.out;
  EXPECT_EQ(slurp(path("straight/config.yaml")), config_before) << "config.yaml untouched";
}

// A checkpoint given by a path relative to the working directory continues its run in place;
// the records then name it relative to the run (before, a failure's end record said there was
// no checkpoint at all).
TEST_F(Checkpoints, ARelativeCheckpointPathIsNamedInTheRecords) {
  auto r = run("MPT_FAULT=preempt_at_step=4 " + train_cmd(path("rel")));
  ASSERT_EQ(r.code, 3) << r.out;
  r = run("cd " + dir_.string() + " && MPT_FAULT=enospc_after=1 " +
          train_cmd("", "--resume rel/checkpoints/step_00000004"));
  EXPECT_EQ(r.code, 1) << r.out;
  const auto recs = read_jsonl(path("rel/metrics.jsonl"));
  EXPECT_EQ(recs.back()["status"], "failed");
  EXPECT_EQ(recs.back()["checkpoint"], "checkpoints/step_00000004") << recs.back().dump();
}

TEST_F(Checkpoints, ResumeRefusesChangedModelOrDataButAllowsSafeKeys) {
  straight();
  auto r = run(train_cmd(path("straight"), "--set model.n_layer=3 --set training.seed=9 "
                                          "--set training.steps=20 --resume"));
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("model.n_layer: checkpoint has 2, config has 3"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("training.seed"), std::string::npos) << r.out;
  r = run(train_cmd(path("straight"), "--resume"));  // already at training.steps
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("nothing to resume"), std::string::npos) << r.out;
  r = run(train_cmd(path("straight"), "--set training.steps=20 --set training.log_every=1 "
                                      "--set checkpoint.every=0 --resume"));
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(read_jsonl(path("straight/metrics.jsonl")).back()["step"], 20);
}

// training.recompute may change on resume: it changes the memory, not the results. bf16, stopped
// at step 8 while recomputing GELU and LayerNorm outputs, resumed recomputing GELU only: the
// records and final tensors of a straight run that keeps them all, and a smaller activation
// arena in the start record.
TEST_F(Checkpoints, RecomputeChangesMemoryNotResults) {
  const std::string bf16 = " --set precision=bf16";
  auto r = run(train_cmd(path("keep"), bf16));
  ASSERT_EQ(r.code, 0) << r.out;
  r = run("MPT_FAULT=preempt_at_step=8 " +
          train_cmd(path("re"), bf16 + " --set training.recompute=gelu+layernorm"));
  ASSERT_EQ(r.code, 3) << r.out;
  r = run(train_cmd(path("re"), bf16 + " --set training.recompute=gelu --resume"));
  ASSERT_EQ(r.code, 0) << r.out;
  const auto a = read_jsonl(path("keep/metrics.jsonl"));
  const auto b = read_jsonl(path("re/metrics.jsonl"));
  // The same records but for the memory the backend holds, which is the point.
  auto results = [](const std::vector<json>& recs) {
    std::vector<json> out = steps_and_evals(recs);
    for (json& r : out) r.erase("memory_bytes"), r.erase("peak_memory_bytes");
    return out;
  };
  EXPECT_EQ(results(a), results(b));
  expect_same_final_checkpoint("re", /*same_config=*/false, "keep");
  const auto starts = events(b, "start");
  ASSERT_EQ(starts.size(), 2u);
  const double kept = events(a, "start")[0]["memory"]["activations"].get<double>();
  const double both = starts[0]["memory"]["activations"].get<double>();
  const double gelu = starts[1]["memory"]["activations"].get<double>();
  EXPECT_LT(both, gelu);
  EXPECT_LT(gelu, kept);
}

// A real SIGTERM (then a second signal while saving): the step finishes, a checkpoint is saved
// and verifies, the run exits 3 and resumes.
TEST_F(Checkpoints, StopSignalsSaveAndExitThree) {
  // One thread: on a loaded machine two threads can take many seconds per tiny step.
  const std::string cmd = train_cmd(path("sig"), "--set training.steps=100000 "
                                                 "--set checkpoint.every=0 --set threads=1");
  // Wait (up to a minute) until training runs, so the handlers are surely installed.
  auto r = run("(" + cmd + " >" + path("log") + " 2>&1 & pid=$!; "
               "for i in $(seq 1 1200); do grep -q '\"loss\"' " + path("sig/metrics.jsonl") +
               " 2>/dev/null && break; sleep 0.05; done; "
               "kill -TERM $pid; sleep 0.1; kill -USR1 $pid; wait $pid; echo rc=$?)");
  EXPECT_NE(r.out.find("rc=3"), std::string::npos) << r.out << slurp(path("log"));
  const auto recs = read_jsonl(path("sig/metrics.jsonl"));
  ASSERT_FALSE(recs.empty());
  EXPECT_EQ(recs.back()["status"], "stopped");
  // The first signal delivered is the one recorded: SIGTERM, unless the process was not
  // scheduled before SIGUSR1 arrived too (Linux then delivers the lower number, 10, first).
  EXPECT_TRUE(recs.back()["signal"] == 15 || recs.back()["signal"] == 10) << recs.back().dump();
  const std::string latest = slurp(path("sig/checkpoints/latest"));
  ASSERT_FALSE(latest.empty());
  r = run(mpt_bin() + " inspect " + path("sig/checkpoints/") + latest.substr(0, 13));
  EXPECT_EQ(r.code, 0) << r.out;
  const int64_t stopped_at = recs.back()["step"];
  r = run(train_cmd(path("sig"), "--set training.steps=" + std::to_string(stopped_at + 2) +
                                     " --set checkpoint.every=0 --set threads=1 --resume"));
  EXPECT_EQ(r.code, 0) << r.out;
}

// SIGHUP (a closed terminal) stops a run like SIGTERM, unless it was ignored when mpt started
// (nohup): then the run goes on. A closed pipe on stdout does not end the run either.
TEST_F(Checkpoints, HangupStopsUnlessIgnoredAndAClosedPipeDoesNot) {
  const std::string cmd = train_cmd(path("hup"), "--set training.steps=100000 "
                                                 "--set checkpoint.every=0 --set threads=1");
  auto wait_and_hup = [&](const std::string& launch, const std::string& run_dir) {
    return run("(" + launch + " >" + path("log") + " 2>&1 & pid=$!; "
               "for i in $(seq 1 1200); do grep -q '\"loss\"' " + path(run_dir + "/metrics.jsonl") +
               " 2>/dev/null && break; sleep 0.05; done; "
               "kill -HUP $pid; sleep 1; kill -0 $pid 2>/dev/null && echo alive && kill -TERM $pid; "
               "wait $pid; echo rc=$?)");
  };
  auto r = wait_and_hup(cmd, "hup");
  EXPECT_NE(r.out.find("rc=3"), std::string::npos) << r.out << slurp(path("log"));
  EXPECT_EQ(read_jsonl(path("hup/metrics.jsonl")).back()["signal"], 1);
  // Ignored at start (what nohup does): still running a second later, then stopped by SIGTERM.
  r = wait_and_hup("trap '' HUP; " + train_cmd(path("nohup"), "--set training.steps=100000 "
                                                              "--set checkpoint.every=0 "
                                                              "--set threads=1"),
                   "nohup");
  EXPECT_NE(r.out.find("alive"), std::string::npos) << r.out << slurp(path("log"));
  EXPECT_EQ(read_jsonl(path("nohup/metrics.jsonl")).back()["signal"], 15);
  // stdout into a pipe whose reader is gone after the first line: the run completes.
  r = run("{ " + train_cmd(path("pipe"), "--set training.steps=6") + " 2>&1; echo rc=$? >" +
          path("pipe_rc") + "; } | head -1 >/dev/null; cat " + path("pipe_rc"));
  EXPECT_NE(r.out.find("rc=0"), std::string::npos) << r.out;
  EXPECT_EQ(read_jsonl(path("pipe/metrics.jsonl")).back()["status"], "completed");
}

TEST_F(Checkpoints, RetentionKeepsTheNewestAndEveryMth) {
  auto r = run(train_cmd(path("ret"), "--set training.steps=10 --set checkpoint.every=2 "
                                      "--set checkpoint.keep_last=2 --set checkpoint.keep_every=4"));
  ASSERT_EQ(r.code, 0) << r.out;
  std::vector<std::string> left;
  for (const auto& e : fs::directory_iterator(path("ret/checkpoints")))
    left.push_back(e.path().filename().string());
  std::sort(left.begin(), left.end());
  EXPECT_EQ(left, (std::vector<std::string>{"latest", "step_00000004", "step_00000008",
                                            "step_00000010"}));
  r = run(mpt_bin() + " inspect " + ckpt("ret", 10));
  ASSERT_EQ(r.code, 0) << r.out;
  for (const char* want : {"step        10", "checksums verified", "transformer.wte.weight",
                           "transformer.h.1.mlp.c_proj.weight.exp_avg_sq"})
    EXPECT_NE(r.out.find(want), std::string::npos) << want << " in " << r.out;
  // "Permanently": a resume that leaves keep_every out keeps what the run kept under it (the
  // checkpoints' own state.json says so), while keep_last now applies to the new ones.
  r = run(train_cmd(path("ret"), "--set training.steps=16 --set checkpoint.every=2 "
                                 "--set checkpoint.keep_last=1 --resume"));
  ASSERT_EQ(r.code, 0) << r.out;
  left.clear();
  for (const auto& e : fs::directory_iterator(path("ret/checkpoints")))
    left.push_back(e.path().filename().string());
  std::sort(left.begin(), left.end());
  EXPECT_EQ(left, (std::vector<std::string>{"latest", "step_00000004", "step_00000008",
                                            "step_00000016"}));
}

// Resuming from an older checkpoint of the same run abandons the newer ones: `latest` moves back
// first, the replay rewrites them, and the result is the same as the original run's.
TEST_F(Checkpoints, ResumeFromAnOlderCheckpointOfTheSameRun) {
  straight();
  fs::copy(path("straight"), path("original"), fs::copy_options::recursive);
  auto r = run(train_cmd(path("straight"), "--resume " + ckpt("straight", 8)));
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(slurp(path("straight/checkpoints/latest")), "step_00000016\n");
  for (const char* f : {"model.safetensors", "optimizer.safetensors", "state.json"})
    EXPECT_TRUE(slurp(ckpt("original", 16) + "/" + f) == slurp(ckpt("straight", 16) + "/" + f)) << f;
}

// A resume from an older checkpoint that cannot start (here its metrics file cannot be opened)
// abandons nothing: the newer checkpoints and `latest` stay as they were.
TEST_F(Checkpoints, AResumeThatCannotStartDeletesNothing) {
  straight();
  fs::rename(path("straight/metrics.jsonl"), path("metrics.keep"));
  fs::create_directories(path("straight/metrics.jsonl"));
  auto r = run(train_cmd(path("straight"), "--resume " + ckpt("straight", 8)));
  EXPECT_NE(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("metrics.jsonl"), std::string::npos) << r.out;
  EXPECT_TRUE(fs::exists(ckpt("straight", 16) + "/state.json"));
  EXPECT_EQ(slurp(path("straight/checkpoints/latest")), "step_00000016\n");
}

// A run that diverges saves no checkpoint of a model whose loss is not finite: its due saves
// are skipped (and recorded), so that retention never pushes out the last good checkpoint.
TEST_F(Checkpoints, ADivergedModelIsNotSaved) {
  auto r = run(train_cmd(path("div"), "--set optimizer.lr=1000 --set schedule.warmup_steps=0"
                                      " --set schedule.min_lr=0 --set optimizer.grad_clip=0"
                                      " --set training.log_every=1 --set checkpoint.every=1"
                                      " --set checkpoint.keep_last=2"));
  EXPECT_EQ(r.code, 1) << "a run that diverges fails: " << r.out;
  const auto recs = read_jsonl(path("div/metrics.jsonl"));
  std::map<int64_t, bool> finite;  // step -> its loss was finite
  for (const auto& rec : recs)
    if (!rec.contains("event")) finite[rec["step"].get<int64_t>()] = rec["loss"].is_number();
  int64_t first_bad = 0;
  for (const auto& [step, ok] : finite)
    if (!ok && !first_bad) first_bad = step;
  ASSERT_GT(first_bad, 0) << "the run must diverge for this test";
  for (const auto& c : events(recs, "checkpoint"))
    EXPECT_TRUE(finite.at(c["step"].get<int64_t>())) << "saved at step " << c["step"];
  const auto skipped = events(recs, "checkpoint_skipped");
  ASSERT_FALSE(skipped.empty());
  EXPECT_EQ(skipped.front()["step"], first_bad);
  EXPECT_TRUE(skipped.front()["loss"].is_string()) << skipped.front();
  for (const auto& e : fs::directory_iterator(path("div/checkpoints"))) {
    const std::string name = e.path().filename().string();
    if (name.rfind("step_", 0) != 0) continue;
    EXPECT_TRUE(finite.at(std::stoll(name.substr(5)))) << name << " holds a diverged model";
  }
}

TEST_F(Checkpoints, ForksNeverWriteIntoAnotherRun) {
  straight();
  fs::create_directories(path("other"));
  write("other/keep.txt", "precious");
  auto r = run(train_cmd(path("other"), "--resume " + ckpt("straight", 8)));
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_FALSE(fs::exists(path("other/metrics.jsonl")));
  // a checkpoint outside RUN/checkpoints/ needs --run-dir
  fs::copy(ckpt("straight", 8), path("loose"), fs::copy_options::recursive);
  r = run(mpt_bin() + " train " + MPT_SOURCE_DIR + "/configs/default.yaml --resume " + path("loose"));
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("--run-dir"), std::string::npos) << r.out;
  // a fork into a fresh directory is a new run that starts where the checkpoint was
  r = run(train_cmd(path("fork"), "--resume " + path("loose")));
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_TRUE(slurp(ckpt("straight", 16) + "/model.safetensors") ==
              slurp(ckpt("fork", 16) + "/model.safetensors"));
}

TEST_F(Checkpoints, SignalInTheLastStepCompletesTheRun) {
  auto r = run("MPT_FAULT=preempt_at_step=16 " + train_cmd(path("last")));
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(read_jsonl(path("last/metrics.jsonl")).back()["status"], "completed");
}

TEST_F(Checkpoints, ARunDirectoryInUseIsRefused) {
  straight();
  auto r = run("flock " + path("straight/.lock") + " " +
               train_cmd(path("straight"), "--set training.steps=20 --resume"));
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("in use"), std::string::npos) << r.out;
}
