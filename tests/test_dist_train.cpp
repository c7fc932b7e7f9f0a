// Data-parallel training end to end: `mpirun -np 2 mpt train` against one process with twice the
// micro-batch, what rank 0 alone writes, and what is refused so far. Skips without MPI.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <sstream>

#include "backend/backend.h"
#include "cli_util.h"

namespace mpt::test {
namespace {

class DistTrain : public CliTest {
 protected:
  void SetUp() override {
    CliTest::SetUp();
#if !MPT_HAVE_MPI
    GTEST_SKIP() << "this build has no MPI";
#endif
  }
  // --oversubscribe: 2 ranks on CI's 2 cores; as root Open MPI also wants --allow-run-as-root.
  static std::string mpirun(int n) {
    return std::string(MPT_MPIEXEC) + " --oversubscribe --allow-run-as-root -np " +
           std::to_string(n) + " ";
  }
  // The start of a bash script: a 2-rank fp32 run of (almost) endless steps in the background
  // (`env` before the command), logging to `log`; once the first step record is written, $mp is
  // mpirun's pid and $rank that of rank 1 (the child of mpirun whose environment says so).
  static std::string launch_and_find_rank_1(const std::string& env, const std::string& run_dir,
                                            const std::string& log) {
    return "#!/bin/bash\n" + env + mpirun(2) + mpt_bin() + train_args("fp32", 2) +
           " --set training.steps=1000000 --run-dir " + run_dir + " > " + log + " 2>&1 &\n"
           "mp=$!\n"
           "for i in $(seq 300); do grep -q '\"step\": *1,' " + run_dir +
           "/metrics.jsonl 2>/dev/null && break; sleep 0.1; done\n"
           "for p in $(pgrep -P $mp); do\n"
           "  tr '\\0' '\\n' < /proc/$p/environ | grep -qx 'OMPI_COMM_WORLD_RANK=1' && rank=$p\n"
           "done\n"
           "[ -n \"$rank\" ] || { echo no-rank-1; kill $mp; exit 3; }\n";
  }
  static std::string train_args(const std::string& precision, int micro_batch) {
    return " train " + std::string(MPT_SOURCE_DIR) + "/configs/default.yaml" + kTiny +
           " --set threads=1 --set training.steps=12 --set training.log_every=1"
           " --set training.eval_every=0 --set checkpoint.every=0 --set precision=" +
           precision + " --set training.micro_batch=" + std::to_string(micro_batch);
  }
};

// 2 ranks x micro-batch B see exactly the windows of 1 rank x 2B (the loader draws the global
// batch, each rank takes its rows) and take the same optimizer steps: per-step losses agree to
// fp32 rounding (the two sum the gradients in different orders), and to the policy's rounding
// for bf16, fp16 and fp8 (whose delayed scales come from amaxes max-reduced over the ranks, that
// is the global batch's, as one process sees them), and bf16-pure (whose bf16 gradients are
// summed in fp32 and rounded once, where one process accumulates them in bf16).
TEST_F(DistTrain, TwoRanksMatchOneRankWithTwiceTheBatch) {
  for (const auto& [precision, rel] : std::vector<std::pair<std::string, double>>{
           {"fp32", 1e-6}, {"bf16", 1e-2}, {"fp16", 1e-2}, {"fp8", 3e-2}, {"bf16-pure", 2e-2}}) {
    SCOPED_TRACE(precision);
    const std::string one = path("one_" + precision), two = path("two_" + precision);
    auto r1 = run(mpt_bin() + train_args(precision, 4) + " --run-dir " + one);
    ASSERT_EQ(r1.code, 0) << r1.out;
    auto r2 = run(mpirun(2) + mpt_bin() + train_args(precision, 2) + " --run-dir " + two);
    ASSERT_EQ(r2.code, 0) << r2.out;
    const auto a = read_jsonl(one + "/metrics.jsonl"), b = read_jsonl(two + "/metrics.jsonl");
    EXPECT_EQ(b.front()["world_size"], 2);
    EXPECT_EQ(b.front()["tokens_per_step"], a.front()["tokens_per_step"]);
    const auto sa = events(a, ""), sb = events(b, "");
    ASSERT_EQ(sa.size(), 12u);
    ASSERT_EQ(sb.size(), 12u) << "rank 0 alone writes the step records";
    for (size_t i = 0; i < sa.size(); ++i) {
      const double la = sa[i]["loss"], lb = sb[i]["loss"];
      EXPECT_NEAR(lb, la, rel * la) << "step " << i + 1;
      // The casts counted are the whole job's: both ranks' activations.
      if (precision != "fp32") {
        EXPECT_EQ(sb[i]["casts"]["activations"]["values"], sa[i]["casts"]["activations"]["values"]);
      }
      EXPECT_FALSE(sa[i].contains("comm_ms"));
      ASSERT_TRUE(sb[i].contains("comm_ms")) << "the all-reduce's share of the step";
      EXPECT_GE(sb[i]["comm_ms"].get<double>(), 0.0);
      EXPECT_LE(sb[i]["comm_ms"].get<double>(), sb[i]["step_ms"].get<double>());
    }
    const double first = sa.front()["loss"], last = sa.back()["loss"];
    EXPECT_LT(last, first) << "the runs learn";
    // Both runs end with a checkpoint: rank 0 wrote it, and it says the job had two processes.
    const auto ends = events(b, "end");
    ASSERT_EQ(ends.size(), 1u);
    const json state = json::parse(slurp(two + "/" + ends[0]["checkpoint"].get<std::string>() +
                                         "/state.json"));
    EXPECT_EQ(state["world_size"], 2);
  }
}

// Stopped after step 6 and resumed, under 2 ranks: the same step records and the same final
// weights as 12 straight steps. Resuming that checkpoint with another number of processes is
// refused: the global batch, and so the data order, depend on it.
TEST_F(DistTrain, ResumeUnderTwoRanksContinuesExactly) {
  const std::string straight = path("straight"), split = path("split");
  const std::string args = train_args("fp32", 2);
  auto r = run(mpirun(2) + mpt_bin() + args + " --run-dir " + straight);
  ASSERT_EQ(r.code, 0) << r.out;
  r = run("MPT_FAULT=preempt_at_step=6 " + mpirun(2) + mpt_bin() + args + " --run-dir " + split);
  ASSERT_NE(r.code, 0) << "stopped: " << r.out;
  ASSERT_TRUE(fs::exists(split + "/checkpoints/step_00000006/state.json")) << r.out;
  auto refused = run(mpt_bin() + args + " --run-dir " + split + " --resume");
  EXPECT_EQ(refused.code, 2) << refused.out;
  EXPECT_NE(refused.out.find("written by a job of 2"), std::string::npos) << refused.out;
  r = run(mpirun(2) + mpt_bin() + args + " --run-dir " + split + " --resume");
  ASSERT_EQ(r.code, 0) << r.out;
  const auto a = events(without_timing(read_jsonl(straight + "/metrics.jsonl")), "");
  const auto b = events(without_timing(read_jsonl(split + "/metrics.jsonl")), "");
  EXPECT_EQ(a, b);
  EXPECT_EQ(slurp(straight + "/checkpoints/step_00000012/model.safetensors"),
            slurp(split + "/checkpoints/step_00000012/model.safetensors"));
}

// An overflow in rank 1's gradients only (fault injection) makes both ranks skip that step: the
// losses follow one process with the same overflow, step for step, skip included.
TEST_F(DistTrain, AnOverflowOnOneRankMakesEveryRankSkip) {
  const std::string one = path("one"), two = path("two");
  auto r = run("MPT_FAULT=nonfinite_at_step=3 " + mpt_bin() + train_args("fp16", 4) +
               " --run-dir " + one);
  ASSERT_EQ(r.code, 0) << r.out;
  const std::string args = train_args("fp16", 2) + " --run-dir " + two;
  r = run(std::string(MPT_MPIEXEC) + " --oversubscribe --allow-run-as-root -np 1 " + mpt_bin() +
          args + " : -np 1 env MPT_FAULT=nonfinite_at_step=3 " + mpt_bin() + args);
  ASSERT_EQ(r.code, 0) << r.out;
  const auto a = events(read_jsonl(one + "/metrics.jsonl"), "");
  const auto b = events(read_jsonl(two + "/metrics.jsonl"), "");
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(b[i]["skipped"], i == 2) << "step " << i + 1;
    EXPECT_EQ(a[i]["skipped"], b[i]["skipped"]) << "step " << i + 1;
    EXPECT_EQ(a[i]["loss_scale"], b[i]["loss_scale"]) << "step " << i + 1;
    if (i != 2) {
      const double la = a[i]["loss"], lb = b[i]["loss"];
      EXPECT_NEAR(lb, la, 1e-2 * la) << "step " << i + 1;
    }
  }
}

// A stop during an evaluation that reaches one rank only (fault injection on rank 1) cuts the
// evaluation short on every rank at the same point: the rank that got it does not wait in a
// collective for the others' whole evaluation (which, twice the 2-second collective timeout
// here, would end the job with exit 1 and no checkpoint). The job stops with a checkpoint that
// says the evaluation is pending (what a resume makes of it: Checkpoints.AStopDuringAn...).
TEST_F(DistTrain, AStopDuringAnEvaluationOnOneRankCutsItShortOnEvery) {
  const std::string split = path("split");
  // 12000 batches: about 4 seconds of evaluation at this size on two ranks.
  const std::string a = train_args("fp32", 2) +
                        " --set training.steps=4 --set training.eval_every=2"
                        " --set training.eval_batches=12000 --run-dir " + split;
  auto r = run("MPT_COMM_TIMEOUT_S=2 " + std::string(MPT_MPIEXEC) +
               " --oversubscribe --allow-run-as-root -np 1 " + mpt_bin() + a +
               " : -np 1 env MPT_FAULT=stop_in_eval_at_step=0 " + mpt_bin() + a);
  EXPECT_NE(r.code, 0) << "stopped: " << r.out;
  EXPECT_EQ(r.out.find("did not finish within"), std::string::npos) << r.out;
  const std::string state = slurp(split + "/checkpoints/step_00000000/state.json");
  ASSERT_FALSE(state.empty()) << r.out;
  EXPECT_EQ(json::parse(state)["eval_pending"], true);
  const auto recs = read_jsonl(split + "/metrics.jsonl");
  EXPECT_EQ(recs.back()["status"], "stopped");
  EXPECT_TRUE(events(recs, "eval").empty());
}

// training.global_batch_tokens means the same training on any number of processes: 2 ranks x
// 1 micro-batch and 1 process x 2 accumulated micro-batches of the same size see the same windows
// and agree to fp32 rounding. A global batch the processes cannot split evenly is refused
// before anything is written, naming the key and the numbers.
TEST_F(DistTrain, GlobalBatchInTokensMeansTheSameOnAnyNumberOfProcesses) {
  const std::string one = path("one"), two = path("two"), odd = path("odd");
  const std::string tokens = " --set training.global_batch_tokens=128";  // 2 x 2 x 32
  auto r = run(mpt_bin() + train_args("fp32", 2) + tokens + " --run-dir " + one);
  ASSERT_EQ(r.code, 0) << r.out;
  r = run(mpirun(2) + mpt_bin() + train_args("fp32", 2) + tokens + " --run-dir " + two);
  ASSERT_EQ(r.code, 0) << r.out;
  const auto a = read_jsonl(one + "/metrics.jsonl"), b = read_jsonl(two + "/metrics.jsonl");
  EXPECT_EQ(a.front()["tokens_per_step"], 128);
  EXPECT_EQ(b.front()["tokens_per_step"], 128);
  const auto sa = events(a, ""), sb = events(b, "");
  ASSERT_EQ(sa.size(), sb.size());
  for (size_t i = 0; i < sa.size(); ++i) {
    const double la = sa[i]["loss"], lb = sb[i]["loss"];
    EXPECT_NEAR(lb, la, 1e-6 * la) << "step " << i + 1;
  }
  r = run(mpirun(2) + mpt_bin() + train_args("fp32", 2) + " --set training.global_batch_tokens=64" +
          " --run-dir " + odd);
  EXPECT_NE(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("training.global_batch_tokens: 64 is not a multiple of micro_batch x "
                       "seq_len x processes (2 x 32 x 2 = 128"),
            std::string::npos)
      << r.out;
  EXPECT_FALSE(fs::exists(odd));
}

// ZeRO-1 (each rank keeps and updates half of the optimizer state, then the weights are
// gathered) computes exactly what every rank keeping all of it computes: the same step records
// and byte-identical checkpoints (the state is gathered before a save), for a policy without a
// master, one with an fp32 master and bf16-pure's stochastic rounding. A ZeRO-1 run stopped and
// resumed under ZeRO-1 continues exactly; its checkpoint also resumes without ZeRO-1 (the files
// are the same). Each rank's predicted optimizer memory halves.
TEST_F(DistTrain, ZeroOneGivesTheBitsOfTheWholeOptimizer) {
  for (const std::string precision : {"fp32", "bf16", "bf16-pure"}) {
    SCOPED_TRACE(precision);
    const std::string whole = path("whole_" + precision), zero = path("zero_" + precision);
    const std::string args = train_args(precision, 2) + " --set checkpoint.every=6";
    const std::string zero_args = args + " --set distributed.zero_stage=1";
    auto r = run(mpirun(2) + mpt_bin() + args + " --run-dir " + whole);
    ASSERT_EQ(r.code, 0) << r.out;
    r = run("MPT_FAULT=preempt_at_step=6 " + mpirun(2) + mpt_bin() + zero_args + " --run-dir " +
            zero);
    ASSERT_NE(r.code, 0) << "stopped: " << r.out;
    EXPECT_NE(r.out.find("ZeRO-1: this process keeps and updates elements"), std::string::npos)
        << r.out;
    auto same_files = [&](const std::string& a, const std::string& b, int step) {
      for (const char* f : {"/model.safetensors", "/optimizer.safetensors"})
        EXPECT_EQ(slurp(checkpoint_dir(a, step) + f), slurp(checkpoint_dir(b, step) + f))
            << f << " at step " << step;
    };
    same_files(whole, zero, 6);
    r = run(mpirun(2) + mpt_bin() + zero_args + " --run-dir " + zero + " --resume");
    ASSERT_EQ(r.code, 0) << r.out;
    same_files(whole, zero, 12);
    const auto a = read_jsonl(whole + "/metrics.jsonl"), b = read_jsonl(zero + "/metrics.jsonl");
    // The same records but for the memory each process holds, which ZeRO-1 reduces.
    auto training = [](const std::vector<json>& recs) {
      std::vector<json> out = events(without_timing(recs), "");
      for (json& r : out) r.erase("memory_bytes"), r.erase("peak_memory_bytes");
      return out;
    };
    EXPECT_EQ(training(a), training(b));
    const json& ma = a.front()["memory"];
    const json& mb = b.front()["memory"];
    EXPECT_LT(mb["optimizer_state"].get<double>(), 0.51 * ma["optimizer_state"].get<double>());
    EXPECT_LE(mb["master_weights"].get<double>(), 0.51 * ma["master_weights"].get<double>());
    // What rank 0 holds while training is what the ledger predicts for one range.
    for (const json& ev : events(b, "memory"))
      EXPECT_LE(ev["memory_vs_plan"].get<double>(), 1.02) << ev.dump();
    EXPECT_EQ(events(b, "memory").size(), 2u) << "one per run, the resumed one included";
    if (precision == "bf16") {
      // The ZeRO-1 checkpoint of step 6, continued by ranks that keep the whole state.
      const std::string fork = path("fork");
      r = run(mpirun(2) + mpt_bin() + args + " --resume " + checkpoint_dir(zero, 6) +
              " --run-dir " + fork);
      ASSERT_EQ(r.code, 0) << r.out;
      same_files(whole, fork, 12);
    }
  }
}

// Under ZeRO-1 rank 1 sends its parts of the optimizer state while rank 0 writes. A save that
// fails on rank 0 in the middle of that (the disk full halfway through optimizer.safetensors,
// with rank 1 between two requests) must end the job, not leave rank 1 waiting for the next
// request: exit 1, naming rank 0 and the cause, and no checkpoint committed.
TEST_F(DistTrain, AFailedZeroOneSaveEndsTheJob) {
  const std::string args = train_args("bf16", 2) +
                           " --set distributed.zero_stage=1 --set checkpoint.every=6";
  // A save that succeeds, for the files' sizes.
  const std::string ok = path("ok");
  auto r = run(mpirun(2) + mpt_bin() + args + " --set training.steps=6 --run-dir " + ok);
  ASSERT_EQ(r.code, 0) << r.out;
  const uintmax_t model = fs::file_size(checkpoint_dir(ok, 6) + "/model.safetensors");
  const uintmax_t optimizer = fs::file_size(checkpoint_dir(ok, 6) + "/optimizer.safetensors");
  const std::string run_dir = path("full");
  const auto t0 = std::chrono::steady_clock::now();
  r = run("MPT_FAULT=enospc_after=" + std::to_string(model + optimizer / 2) + " " + mpirun(2) +
          mpt_bin() + args + " --run-dir " + run_dir);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.out.find("rank 0 of 2 failed"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("No space left on device"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("optimizer.safetensors"), std::string::npos) << r.out;
  EXPECT_LT(s, 60.0) << r.out;
  EXPECT_FALSE(fs::exists(run_dir + "/checkpoints/latest"));
  EXPECT_EQ(read_jsonl(run_dir + "/metrics.jsonl").back()["status"], "failed");
}

// A stop signal to one rank only (as a scheduler's SIGTERM may reach one process first): every
// rank finishes the same step, rank 0 saves its checkpoint, the job exits non-zero, and it
// resumes.
TEST_F(DistTrain, ASignalToOneRankStopsEveryRankAtTheSameStep) {
  const std::string run_dir = path("run"), log = path("log");
  write("term.sh", launch_and_find_rank_1("", run_dir, log) +
                       "kill -TERM $rank; wait $mp; echo \"rc=$?\"\n");
  auto r = run("bash " + path("term.sh"));
  ASSERT_NE(r.out.find("rc="), std::string::npos) << r.out << slurp(log);
  EXPECT_EQ(r.out.find("rc=0"), std::string::npos) << r.out;
  const std::string out = slurp(log);
  const auto recs = read_jsonl(run_dir + "/metrics.jsonl");
  ASSERT_FALSE(recs.empty());
  const json& end = recs.back();
  ASSERT_EQ(end["status"], "stopped") << out;
  EXPECT_EQ(end["signal"], 15);
  const int64_t step = end["step"];
  // Both ranks say they stopped after that step (rank 1 received the signal, rank 0 did not).
  for (const char* rank : {"[rank 0]", "[rank 1]"}) {
    bool said = false;
    std::istringstream lines(out);
    for (std::string line; std::getline(lines, line);)
      said |= line.find(rank) != std::string::npos &&
              line.find("stopped by signal 15 after step " + std::to_string(step) + ";") !=
                  std::string::npos;
    EXPECT_TRUE(said) << rank << " in\n" << out;
  }
  ASSERT_TRUE(fs::exists(run_dir + "/" + end["checkpoint"].get<std::string>() + "/state.json"));
  r = run(mpirun(2) + mpt_bin() + train_args("fp32", 2) + " --set training.steps=" +
          std::to_string(step + 2) + " --run-dir " + run_dir + " --resume");
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(read_jsonl(run_dir + "/metrics.jsonl").back()["status"], "completed");
}

// The CUDA backend under several processes goes through NCCL, one GPU per local rank. Without a
// usable GPU (here, and in CI) every rank fails to start NCCL, the job ends naming a rank and
// why, and nothing is written; a build without NCCL says so instead.
TEST_F(DistTrain, GpuTrainingWithoutUsableGpusIsRefusedBeforeWriting) {
  if (backend_is_cuda("auto")) GTEST_SKIP() << "this machine has a usable GPU";
  const std::string run_dir = path("run");
  auto r = run(mpirun(2) + mpt_bin() + train_args("bf16", 2) + " --set backend=cuda --run-dir " +
               run_dir);
  EXPECT_NE(r.code, 0) << r.out;
#if MPT_HAVE_NCCL
  EXPECT_NE(r.out.find("could not start NCCL: rank "), std::string::npos) << r.out;
#else
  EXPECT_NE(r.out.find("needs NCCL, and this mpt was built without it"), std::string::npos)
      << r.out;
#endif
  EXPECT_FALSE(fs::exists(run_dir));
}

// Ranks that would train different things (here rank 1's learning rate) stop at start-up, all
// of them, naming the differing keys, before anything is written.
TEST_F(DistTrain, MismatchedConfigsAreRefusedAtStartup) {
  const std::string run_dir = path("run");
  const std::string args = train_args("fp32", 2) + " --run-dir " + run_dir;
  auto r = run(std::string(MPT_MPIEXEC) + " --oversubscribe --allow-run-as-root -np 1 " +
               mpt_bin() + args + " : -np 1 " + mpt_bin() + args + " --set optimizer.lr=0.5");
  EXPECT_NE(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("rank 1 differs from rank 0 in: optimizer.lr"), std::string::npos) << r.out;
  EXPECT_FALSE(fs::exists(run_dir));
}

// A shard that only rank 1 reads (its own data.train) is corrupt: the job ends at once, naming
// rank 1 and the file, instead of rank 0 waiting for rank 1 forever.
TEST_F(DistTrain, AFailingRankEndsTheJobNamingItself) {
  const std::string run_dir = path("run");
  const std::string bad = write("bad_shard.bin", std::string(100, 'x'));
  const std::string args = train_args("fp32", 2) + " --run-dir " + run_dir;
  const auto t0 = std::chrono::steady_clock::now();
  auto r = run(std::string(MPT_MPIEXEC) + " --oversubscribe --allow-run-as-root -np 1 " +
               mpt_bin() + args + " : -np 1 " + mpt_bin() + args + " --set 'data.train=[" +
               bad + "]'");
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_NE(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("rank 1 of 2 failed"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("bad_shard.bin"), std::string::npos) << r.out;
  EXPECT_LT(s, 10.0);
  EXPECT_FALSE(fs::exists(run_dir));
}

// kill -9 of one rank mid-training: mpirun notices and ends the job, non-zero, within seconds.
TEST_F(DistTrain, KillingOneRankEndsTheJobWithinSeconds) {
  const std::string run_dir = path("run");
  const std::string script = path("kill.sh");
  write("kill.sh",
        "#!/bin/bash\n" + mpirun(2) + mpt_bin() + train_args("fp32", 2) +
            " --set training.steps=1000000 --run-dir " + run_dir + " > " + path("log") +
            " 2>&1 &\n"
            "mp=$!\n"
            // Wait for the first step record: both ranks are training.
            "for i in $(seq 300); do grep -q '\"step\": *1,' " + run_dir +
            "/metrics.jsonl 2>/dev/null && break; sleep 0.1; done\n"
            "rank=$(pgrep -P $mp | tail -1)\n"
            "[ -n \"$rank\" ] || { echo no-rank-process; exit 3; }\n"
            "t0=$(date +%s%N); kill -9 $rank; wait $mp; rc=$?; t1=$(date +%s%N)\n"
            "echo \"rc=$rc ms=$(( (t1 - t0) / 1000000 ))\"\n");
  auto r = run("bash " + script);
  ASSERT_EQ(r.code, 0) << r.out;
  int rc = -1, ms = -1;
  ASSERT_EQ(std::sscanf(r.out.substr(r.out.find("rc=")).c_str(), "rc=%d ms=%d", &rc, &ms), 2) << r.out;
  EXPECT_NE(rc, 0) << slurp(path("log"));
  EXPECT_LT(ms, 10000);
}

// A rank that hangs without dying (here stopped with SIGSTOP after the first step): the other
// rank's collective does not finish within MPT_COMM_TIMEOUT_S, it says what it waited for and
// exits, and mpirun ends the job, non-zero, within seconds of the timeout.
TEST_F(DistTrain, AHangingRankEndsTheJobAfterTheCollectiveTimeout) {
  const std::string run_dir = path("run"), log = path("log");
  write("hang.sh",
        launch_and_find_rank_1("MPT_COMM_TIMEOUT_S=2 ", run_dir, log) +
            // Whatever happens, nothing outlives the test.
            "( sleep 60; kill -9 $rank $mp ) > /dev/null 2>&1 & guard=$!\n"
            "t0=$(date +%s%N); kill -STOP $rank; wait $mp; rc=$?; t1=$(date +%s%N)\n"
            "kill -9 $rank 2>/dev/null; kill $guard 2>/dev/null\n"
            "echo \"rc=$rc ms=$(( (t1 - t0) / 1000000 ))\"\n");
  auto r = run("bash " + path("hang.sh"));
  ASSERT_NE(r.out.find("rc="), std::string::npos) << r.out << slurp(log);
  int rc = -1, ms = -1;
  ASSERT_EQ(std::sscanf(r.out.substr(r.out.find("rc=")).c_str(), "rc=%d ms=%d", &rc, &ms), 2);
  const std::string out = slurp(log);
  EXPECT_NE(rc, 0) << out;
  EXPECT_LT(ms, 15000) << out;
  std::printf("the job ended %d ms after rank 1 stopped (timeout 2 s)\n", ms);
  EXPECT_NE(out.find("rank 0 of 2: MPI_"), std::string::npos) << out;
  EXPECT_NE(out.find("did not finish within the timeout of 2"), std::string::npos) << out;
}

}  // namespace
}  // namespace mpt::test
