// fp16 loss scaling end to end, through `mpt train`: a step whose gradients overflow is skipped
// and leaves the parameters, master weights and optimizer state bit-identical; the scale backs
// off and training recovers; each skipped step names the op where the overflow began.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>

#include "backend/cpu/cpu_backend.h"
#include "cli_util.h"
#include "config/config.h"
#include "io/safetensors.h"
#include "model/gpt.h"

using nlohmann::json;
using namespace mpt;
using namespace mpt::test;

namespace {

class LossScaling : public CliTest {
 protected:
  std::string train_cmd(const std::string& run, const std::string& extra) const {
    return mpt_bin() + " train " + MPT_SOURCE_DIR + "/configs/default.yaml" + kTiny +
           " --set precision=fp16 --set training.log_every=1 --set training.eval_every=0"
           " --set checkpoint.every=0 --run-dir " + path(run) + " " + extra;
  }
};

// A static scale of 2^100 overflows fp16 in every backward: all steps are skipped, and the
// final checkpoint holds exactly the initial weights (the fp32 master, as init_weights draws
// them) and untouched moments.
TEST_F(LossScaling, OverflowingStepsAreSkippedAndChangeNothing) {
  auto r = run(train_cmd("huge", "--set training.steps=3 --set loss_scale.mode=static"
                                 " --set loss_scale.init_scale=1.2676506002282294e30"));
  ASSERT_EQ(r.code, 0) << r.out;
  const auto recs = read_jsonl(path("huge/metrics.jsonl"));
  const std::vector<json> steps = events(recs, "");  // the step records
  ASSERT_EQ(steps.size(), 3u);
  for (size_t i = 0; i < steps.size(); ++i) {
    EXPECT_EQ(steps[i]["skipped"], true);
    EXPECT_EQ(steps[i]["skipped_total"], int(i + 1));
    EXPECT_EQ(steps[i]["loss_scale"], 1.2676506002282294e30);
    EXPECT_TRUE(steps[i]["grad_norm"].is_string()) << steps[i].dump();  // "inf" or "nan"
  }
  // One event per skipped step, naming the op where the first non-finite value appeared: the
  // scaled loss gradient itself overflows fp16 in the classifier.
  const auto bad = events(recs, "nonfinite");
  ASSERT_EQ(bad.size(), 3u);
  for (const auto& e : bad) {
    EXPECT_EQ(e["op"], "crossentropy_forward_backward") << e.dump();
    EXPECT_EQ(e["tensor"], "dlogits");
    EXPECT_EQ(e["pass"], "backward");
    EXPECT_EQ(e["layer"], -1);
    EXPECT_GT(e["nonfinite_values"].get<int64_t>(), 0);
  }
  EXPECT_NE(r.out.find("step skipped"), std::string::npos) << r.out;

  // The checkpoint: weights as initialised, moments zero, no optimizer step taken.
  const std::string ckpt = path("huge/checkpoints/step_00000003");
  const json state = json::parse(slurp(ckpt + "/state.json"));
  EXPECT_EQ(state["optimizer_step"], 0);
  EXPECT_EQ(state["numerics"]["loss_scaler"]["skipped_total"], 3);
  const Config cfg = load_config(std::string(MPT_SOURCE_DIR) + "/configs/default.yaml",
                                 {"model.n_layer=2", "model.n_embd=32", "model.n_head=2",
                                  "precision=fp16"});
  CpuBackend be(1);
  Gpt init(cfg.model, be, PrecisionPolicy::preset("fp16"));
  init.init_weights(cfg.model.init_seed, cfg.model.init_std);
  const auto model = safetensors::File::open(ckpt + "/model.safetensors");
  const auto moments = safetensors::File::open(ckpt + "/optimizer.safetensors");
  for (size_t i = 0; i < init.params().size(); ++i) {
    const std::string& name = init.params()[i].name;
    const Tensor w = init.weights(i);
    const auto& e = model.entry(name);
    ASSERT_EQ(e.dtype, DType::f32) << name << ": the checkpoint holds the fp32 master";
    EXPECT_EQ(std::memcmp(model.data(e), w.data, w.bytes()), 0) << name << " changed";
    for (const std::string& m : {name + ".exp_avg", name + ".exp_avg_sq"}) {
      const auto& me = moments.entry(m);
      const float* v = static_cast<const float*>(moments.data(me));
      for (int64_t k = 0; k < me.shape.numel(); ++k) ASSERT_EQ(v[k], 0.0f) << m;
    }
  }
}

// Dynamic scaling from 2^40: the scale halves at each overflow until the gradients fit fp16,
// then training proceeds as it would have (the loss falls), with no further skips.
TEST_F(LossScaling, DynamicScaleBacksOffAndRecovers) {
  auto r = run(train_cmd("recover", "--set training.steps=40 --set loss_scale.init_scale=1099511627776"
                                    " --set loss_scale.max_scale=1099511627776"));
  ASSERT_EQ(r.code, 0) << r.out;
  const auto recs = read_jsonl(path("recover/metrics.jsonl"));
  const std::vector<json> steps = events(recs, "");  // the step records
  ASSERT_EQ(steps.size(), 40u);
  // Skips come first, each halving the scale; after the first taken step none follows.
  size_t first_taken = 0;
  while (first_taken < steps.size() && steps[first_taken]["skipped"] == true) ++first_taken;
  ASSERT_GT(first_taken, 0u) << "2^40 should overflow fp16";
  ASSERT_LT(first_taken, 30u) << "the scale never recovered";
  for (size_t i = 0; i < first_taken; ++i)
    EXPECT_EQ(steps[i]["loss_scale"].get<double>(), std::ldexp(1.0, 40 - int(i)));
  for (size_t i = first_taken; i < steps.size(); ++i) {
    EXPECT_EQ(steps[i]["skipped"], false) << "step " << i + 1;
    EXPECT_EQ(steps[i]["loss_scale"].get<double>(), std::ldexp(1.0, 40 - int(first_taken)));
    EXPECT_TRUE(steps[i]["grad_norm"].is_number());
  }
  EXPECT_EQ(steps.back()["skipped_total"], int(first_taken));
  EXPECT_EQ(events(recs, "nonfinite").size(), first_taken);
  EXPECT_LT(steps.back()["loss"].get<double>(), steps[first_taken]["loss"].get<double>() - 0.2);
}

}  // namespace
