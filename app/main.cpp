// The `mpt` executable: command-line parsing and exit codes only; the work lives in src/.
#include <CLI/CLI.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <string>
#include <vector>

#include "compare/compare.h"
#include "compare/policies.h"
#include "compare/svg.h"
#include "config/config.h"
#include "core/error.h"
#include "core/text.h"
#include "data/prepare.h"
#include "data/shard.h"
#include "io/checkpoint.h"
#include "io/files.h"
#include "train/trainer.h"

namespace {

int run_train(const std::string& config_path, const std::vector<std::string>& sets,
              const mpt::TrainOptions& opt) {
  const mpt::Config cfg = mpt::load_config(config_path, sets);
  const mpt::TrainResult r = mpt::train(cfg, opt);
  return static_cast<int>(r.stopped_by_signal ? mpt::ExitCode::stopped : mpt::ExitCode::ok);
}

int run_prepare(const std::vector<std::string>& inputs, const std::string& out, double val_fraction,
                int64_t shard_tokens) {
  mpt::data::PrepareOptions opt;
  opt.val_fraction = val_fraction;
  opt.shard_tokens = shard_tokens;
  const auto r = mpt::data::prepare_shards(inputs, out, opt);
  for (const auto& s : r.train_shards) std::printf("train shard %s\n", s.c_str());
  for (const auto& s : r.val_shards) std::printf("val   shard %s\n", s.c_str());
  std::printf("%lld train tokens, %lld val tokens (byte tokenizer, vocab 256)\n",
              static_cast<long long>(r.train_tokens), static_cast<long long>(r.val_tokens));
  return 0;
}

// Every shard is inspected, a bad one reported without hiding the rest; exit 2 if any was bad.
int run_inspect(const std::vector<std::string>& shards) {
  int bad = 0;
  for (const auto& s : shards) {
    try {
      std::printf("%s\n", mpt::data::format_shard_info(mpt::data::inspect_shard(s)).c_str());
    } catch (const std::exception& e) {
      std::fflush(stdout);
      std::fprintf(stderr, "mpt: error: %s\n", e.what());
      ++bad;
    }
  }
  return bad ? static_cast<int>(mpt::ExitCode::bad_input) : 0;
}

int run_compare(const std::vector<std::string>& dirs, const std::string& baseline,
                const std::string& out) {
  const auto c = mpt::compare::compare_runs(dirs, baseline);
  std::fflush(stdout);
  for (const auto& w : c.warnings) std::fprintf(stderr, "mpt: warning: %s\n", w.c_str());
  std::printf("%s", mpt::compare::format_table(c).c_str());
  if (!out.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(out, ec);
    if (ec) throw mpt::InputError("--out " + out + ": cannot create the directory: " + ec.message());
    const std::string json_path = (std::filesystem::path(out) / "compare.json").string();
    const std::string svg_path = (std::filesystem::path(out) / "compare.svg").string();
    mpt::write_file_atomic(json_path, mpt::compare::to_json(c).dump(2) + "\n");
    mpt::write_file_atomic(svg_path, mpt::compare::render_svg(c));
    std::printf("\nwrote %s and %s\n", json_path.c_str(), svg_path.c_str());
  }
  return 0;
}

// --policies: train the runs (or what is left of them), then compare them as above.
int run_compare_policies(const mpt::compare::PoliciesOptions& options) {
  const auto plan = mpt::compare::plan_policies(options);
  const auto outcome = mpt::compare::train_policies(plan);
  if (!outcome.stopped.empty()) {
    std::fflush(stdout);
    std::fprintf(stderr, "mpt: comparison %s; run the same command again to continue\n",
                 outcome.stopped.c_str());
    return static_cast<int>(mpt::ExitCode::stopped);
  }
  const int rc = run_compare(outcome.dirs, outcome.baseline_dir, options.out);
  if (!outcome.failed.empty()) {
    std::fflush(stdout);
    std::fprintf(stderr,
                 "mpt: error: training failed in %s (compared as far as it got, and not trained "
                 "again by a rerun: delete its run directory for that)\n",
                 mpt::join(outcome.failed, ", ").c_str());
    return static_cast<int>(mpt::ExitCode::runtime_failure);
  }
  return rc;
}

// --set KEY=VALUE, repeatable, for `train` and `compare --policies`.
CLI::Option* add_set_option(CLI::App* cmd, std::vector<std::string>& sets, const std::string& help) {
  return cmd->add_option("--set", sets, help)
      ->type_name("KEY=VALUE")
      ->expected(1)  // one override per --set, so a config file after it stays positional
      ->allow_extra_args(false)
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"mpt: mixed-precision GPT trainer", "mpt"};
  app.set_version_flag("--version", std::string("mpt ") + MPT_VERSION);
  app.require_subcommand(1);

  std::string config_path, run_dir;
  std::vector<std::string> sets;
  auto* train = app.add_subcommand("train", "Train a GPT as described by a YAML config");
  train->add_option("config", config_path,
                    "YAML config file (see docs/config.md); without one, the built-in default")
      ->check(CLI::ExistingFile);
  add_set_option(train, sets, "Override a config key: --set key.path=value (repeatable)");
  train->add_option("--run-dir", run_dir, "Write the run here instead of output.dir/output.name");
  mpt::TrainOptions train_opt;
  train->add_flag("--dry-run", train_opt.dry_run,
                  "Validate the config and data, print the model, data and predicted memory, "
                  "and exit without creating or training anything");
  auto* resume = train->add_option(
      "--resume", train_opt.resume_from,
      "Continue from the run's latest checkpoint, or from the checkpoint directory given "
      "(put it after the config file)");
  resume->expected(0, 1)->type_name("[CHECKPOINT]");

  std::string inspect_path;
  auto* inspect_ckpt = app.add_subcommand(
      "inspect", "Print what a checkpoint holds and verify every checksum");
  inspect_ckpt->add_option("checkpoint", inspect_path, "A checkpoint directory (step_NNNNNNNN)")
      ->required();

  auto* data = app.add_subcommand("data", "Prepare and inspect token shards");
  data->require_subcommand(1);
  std::vector<std::string> inputs;
  std::string out_dir;
  double val_fraction = 0.1;
  int64_t shard_tokens = 100'000'000;
  auto* prepare = data->add_subcommand(
      "prepare", "Turn text files into llm.c-format token shards (byte-level tokenizer)");
  prepare->add_option("--input", inputs, "Text files, concatenated in order")
      ->required()
      ->check(CLI::ExistingFile);
  prepare->add_option("--out", out_dir, "Output directory for train_*.bin and val_*.bin")
      ->required();
  prepare->add_option("--val-fraction", val_fraction, "Fraction of tokens for validation")
      ->capture_default_str();
  prepare->add_option("--shard-tokens", shard_tokens, "Maximum tokens per shard")
      ->capture_default_str();
  std::vector<std::string> shards;
  auto* inspect = data->add_subcommand("inspect", "Print a shard's header, token count and range");
  inspect->add_option("shards", shards, "Shard files")->required();

  std::vector<std::string> compare_dirs;
  std::string compare_baseline, compare_policies;
  mpt::compare::PoliciesOptions policies_opt;
  auto* compare = app.add_subcommand(
      "compare", "Compare runs: final validation loss against a baseline, seed noise, "
                 "throughput and memory; or train a config under several precision policies "
                 "and compare those (docs/compare.md)");
  compare->add_option("runs", compare_dirs, "Run directories (each holding metrics.jsonl)")
      ->type_name("RUN_DIR...");
  auto* c_policies = compare->add_option(
      "--policies", compare_policies,
      "Instead of RUN_DIRs: train the config under each of these precision policies (the "
      "baseline with --seeds data seeds) into --out DIR, then compare; rerun to continue");
  c_policies->type_name("P1,P2,...");
  auto* c_config = compare->add_option("--config", policies_opt.config_path,
                                       "With --policies: the YAML config (default: the built-in "
                                       "one)");
  c_config->check(CLI::ExistingFile)->type_name("CONFIG.yaml");
  auto* c_seeds = compare->add_option("--seeds", policies_opt.seeds,
                                      "With --policies: runs of the baseline policy, with "
                                      "training.seed, +1, ... (default 1; 2 or more give the "
                                      "noise band)");
  c_seeds->type_name("K");
  auto* c_set = add_set_option(compare, policies_opt.sets,
                               "With --policies: override a config key in every run (repeatable)");
  compare->add_option("--baseline", compare_baseline,
                      "The run the others are compared with: one of the RUN_DIRs (default: the "
                      "first fp32 run, else the first), or with --policies a policy (default: "
                      "the first)")
      ->type_name("RUN|POLICY");
  auto* c_out = compare->add_option("--out", policies_opt.out,
                      "Write compare.json and compare.svg into this directory (default: write "
                      "nothing, print the table only); required with --policies, whose runs go "
                      "there too")
      ->type_name("DIR");

  // A first word that names no subcommand: say so (CLI11 would say one is required).
  if (argc > 1 && argv[1][0] != '-') {
    std::vector<std::string> names;
    for (const CLI::App* sub : app.get_subcommands({})) names.push_back(sub->get_name());
    if (std::find(names.begin(), names.end(), argv[1]) == names.end()) {
      std::string list;
      for (const auto& n : names) list += (list.empty() ? "" : ", ") + n;
      std::fprintf(stderr, "mpt: error: unknown subcommand '%s' (expected one of: %s; mpt --help)\n",
                   argv[1], list.c_str());
      return static_cast<int>(mpt::ExitCode::bad_input);
    }
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);  // prints help, version or the parse error
    return rc == 0 ? 0 : static_cast<int>(mpt::ExitCode::bad_input);
  }

  try {
    if (*train) {
      // An unset shell variable ($RUN) gives an empty value: not the same as leaving it out.
      if (train->get_option("--run-dir")->count() > 0 && run_dir.empty())
        throw mpt::InputError("--run-dir: empty; give a directory, or leave the option out to "
                              "write under output.dir/output.name");
      train_opt.run_dir = run_dir;
      train_opt.resume = resume->count() > 0;
      // `--resume ""` (an unset $CKPT) is not `--resume` alone, which means the run's latest;
      // CLI11 gives both as an empty value, so the arguments themselves tell them apart.
      for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if (a == "--resume=" || (a == "--resume" && i + 1 < argc && argv[i + 1][0] == '\0'))
          throw mpt::InputError("--resume: an empty checkpoint path; give a checkpoint "
                                "directory, or --resume alone for the run's latest");
      }
      return run_train(config_path, sets, train_opt);
    }
    if (*inspect_ckpt) {
      std::printf("%s", mpt::describe_checkpoint(inspect_path).c_str());
      return 0;
    }
    if (*compare) {
      if (c_policies->count() == 0) {
        for (const auto* opt : {c_config, c_seeds, c_set})
          if (opt->count() > 0)
            throw mpt::InputError(opt->get_name() + " goes with --policies only (to train runs)");
        if (compare_dirs.empty())
          throw mpt::InputError("compare: give run directories, or --policies to train them "
                                "(mpt compare --help)");
        // --out checked before the comparison's work, which it would otherwise follow.
        if (c_out->count() > 0) {
          std::error_code ec;
          if (policies_opt.out.empty())
            throw mpt::InputError("--out: empty; give a directory, or leave the option out to "
                                  "print the table only");
          if (std::filesystem::exists(policies_opt.out, ec) &&
              !std::filesystem::is_directory(policies_opt.out, ec))
            throw mpt::InputError("--out " + policies_opt.out +
                                  ": exists and is not a directory");
        }
        return run_compare(compare_dirs, compare_baseline, policies_opt.out);
      }
      if (!compare_dirs.empty())
        throw mpt::InputError("--policies trains its own runs: give RUN_DIRs or --policies, not "
                              "both (got " + compare_dirs.front() + ")");
      policies_opt.policies = mpt::compare::parse_policy_list(compare_policies);
      policies_opt.baseline = compare_baseline;
      return run_compare_policies(policies_opt);
    }
    if (*prepare) return run_prepare(inputs, out_dir, val_fraction, shard_tokens);
    if (*inspect) return run_inspect(shards);
  } catch (const mpt::Error& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "mpt: error: %s\n", e.what());
    return static_cast<int>(e.code());
  } catch (const std::exception& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "mpt: error: %s\n", e.what());
    return static_cast<int>(mpt::ExitCode::runtime_failure);
  }
  return static_cast<int>(mpt::ExitCode::bad_input);
}
