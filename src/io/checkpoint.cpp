#include "io/checkpoint.h"

#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>

#include "core/error.h"
#include "io/files.h"

namespace fs = std::filesystem;

namespace mpt {
namespace {

constexpr int kFormatVersion = 1;
constexpr const char* kModelFile = "model.safetensors";
constexpr const char* kOptimizerFile = "optimizer.safetensors";
constexpr const char* kStateFile = "state.json";
constexpr const char* kLatest = "latest";
constexpr const char* kTmpPrefix = ".tmp-";

std::string step_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "step_%08lld", static_cast<long long>(step));
  return buf;
}

}  // namespace

bool parse_step_name(const std::string& name, int64_t* step) {
  if (name.size() < 6 || name.compare(0, 5, "step_") != 0) return false;
  int64_t v = 0;
  for (size_t i = 5; i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9' || v > (INT64_MAX - 9) / 10) return false;
    v = v * 10 + (name[i] - '0');
  }
  *step = v;
  return true;
}

namespace {

std::string hex64(uint64_t h) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

// state.json cannot hold its own checksum, so it holds the checksum of its content without that
// field; nlohmann::json dumps the same object to the same text every time (sorted keys).
std::string content_checksum(nlohmann::json j) {
  j.erase("state_checksum");
  const std::string text = j.dump();
  return hex64(XXH3_64bits(text.data(), text.size()));
}

// A small file's text; nullopt when it does not exist. InputError for anything but a regular
// file (opening a FIFO would wait for a writer forever; a directory reads as an I/O error).
std::optional<std::string> read_small_file(const std::string& path) {
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (!fs::exists(st)) return std::nullopt;
  if (!fs::is_regular_file(st)) throw InputError(path + ": not a regular file");
  const MappedFile m = MappedFile::map(path);
  return std::string(static_cast<const char*>(m.data()), m.size());
}

std::vector<std::pair<int64_t, fs::path>> committed_steps(const fs::path& dir) {
  std::vector<std::pair<int64_t, fs::path>> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    int64_t step;
    if (e.is_directory(ec) && parse_step_name(e.path().filename().string(), &step))
      out.emplace_back(step, e.path());
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  return out;
}

// The newest checkpoint below `below_step` that verifies, for error messages; "" if none.
std::string newest_verified(const fs::path& dir, int64_t below_step) {
  for (const auto& [step, path] : committed_steps(dir)) {
    if (step >= below_step) continue;
    try {
      load_checkpoint(path.string());
      return path.string();
    } catch (const InputError&) {
    }
  }
  return "";
}

std::string fallback_hint(const fs::path& dir, int64_t below_step) {
  const std::string ok = newest_verified(dir, below_step);
  return ok.empty() ? "; no earlier checkpoint of this run verifies"
                    : "; the newest earlier checkpoint that verifies is " + ok +
                          " (continue from it with --resume " + ok + ")";
}

}  // namespace

FaultPlan FaultPlan::from_env() {
  FaultPlan f;
  const char* env = std::getenv("MPT_FAULT");
  if (!env || !*env) return f;
  std::stringstream items(env);
  std::string item;
  while (std::getline(items, item, ',')) {
    const size_t eq = item.find('=');
    const std::string key = item.substr(0, eq), value = eq == std::string::npos ? "" : item.substr(eq + 1);
    // A whole decimal number, at least `min`, that fits an int64 (steps start at 1).
    auto number = [&](int64_t min, int64_t* out) {
      char* end = nullptr;
      errno = 0;
      const long long v = std::strtoll(value.c_str(), &end, 10);
      if (value.empty() || *end != '\0' || errno == ERANGE || v < min) return false;
      *out = v;
      return true;
    };
    if (key == "crash" && (value == "in_file" || value == "before_rename" || value == "in_latest" ||
                           value == "in_delete")) {
      f.crash_point = value;
    } else if (key == "enospc_after" && number(0, &f.enospc_after)) {
    } else if (key == "crash_step" && number(1, &f.crash_step)) {
    } else if (key == "preempt_at_step" && number(1, &f.preempt_at_step)) {
    } else if (key == "nonfinite_at_step" && number(1, &f.nonfinite_at_step)) {
    } else if (key == "stop_in_eval_at_step" && number(0, &f.stop_in_eval_at_step)) {
    } else {
      throw InputError("MPT_FAULT: cannot use '" + item +
                       "' (expected crash=in_file|before_rename|in_latest|in_delete, "
                       "crash_step=N, enospc_after=BYTES, preempt_at_step=N, "
                       "nonfinite_at_step=N, stop_in_eval_at_step=N0; N >= 1, N0 and BYTES "
                       ">= 0)");
    }
  }
  return f;
}

void FaultPlan::crash_if(const char* point, int64_t step) const {
  if (crash_point != point || (crash_step >= 0 && crash_step != step)) return;
  std::fprintf(stderr, "mpt: fault injection: crashing at %s\n", point);
  std::fflush(stderr);
  std::_Exit(86);  // no destructors, no flushing: as abrupt as a kill
}

Checkpoint load_checkpoint(const std::string& dir) {
  fs::path name = fs::path(dir).lexically_normal();
  if (name.filename().empty()) name = name.parent_path();
  const std::string base = name.filename().string();
  if (base.rfind(kTmpPrefix, 0) == 0)
    throw InputError(dir + ": an uncommitted checkpoint (a save that did not finish: mpt never "
                     "reads these); give a committed one, RUN/checkpoints/step_NNNNNNNN");
  const std::string state_path = (fs::path(dir) / kStateFile).string();
  const std::optional<std::string> text = read_small_file(state_path);
  if (!text) {
    std::error_code ec;
    const bool run_dir = fs::exists(fs::path(dir) / "checkpoints", ec);
    if (run_dir || fs::exists(fs::path(dir) / kLatest, ec)) {
      const fs::path ckpts = run_dir ? fs::path(dir) / "checkpoints" : fs::path(dir);
      throw InputError(dir + ": a run's directory, not a checkpoint: give one of its checkpoints, " +
                       (ckpts / "step_NNNNNNNN").string() + " (the newest is named in " +
                       (ckpts / kLatest).string() + ")");
    }
    int64_t step = 0;
    throw InputError(state_path + ": missing (" +
                     (parse_step_name(base, &step)
                          ? "the checkpoint is incomplete or damaged: a save or a deletion cut short"
                          : dir + " is not a checkpoint directory") +
                     ")");
  }
  nlohmann::json j = nlohmann::json::parse(*text, nullptr, false);
  if (j.is_discarded())
    throw InputError(state_path + ": not valid JSON (truncated or corrupted)");
  if (!j.is_object() || !j.contains("state_checksum") || !j["state_checksum"].is_string() ||
      j["state_checksum"].get<std::string>() != content_checksum(j))
    throw InputError(state_path + ": checksum mismatch (the file was modified or corrupted)");
  try {
    if (j.at("format_version").get<int>() != kFormatVersion)
      throw InputError(state_path + ": checkpoint format version " +
                       j.at("format_version").dump() + ", this mpt reads " +
                       std::to_string(kFormatVersion));
    // Each file is mapped once: its size and XXH3-64 (xxHash, https://github.com/Cyan4973/xxHash)
    // checked against state.json, then the same bytes parsed.
    std::vector<safetensors::File> files;
    for (const char* name : {kModelFile, kOptimizerFile}) {
      const auto& want = j.at("files").at(name);
      const std::string path = (fs::path(dir) / name).string();
      MappedFile bytes = MappedFile::map(path);
      if (bytes.size() != want.at("bytes").get<uint64_t>())
        throw InputError(path + ": " + std::to_string(bytes.size()) +
                         " bytes, but state.json records " + want.at("bytes").dump() +
                         " (truncated or replaced)");
      if (hex64(XXH3_64bits(bytes.data(), bytes.size())) != want.at("xxh3_64").get<std::string>())
        throw InputError(path + ": checksum mismatch (corrupted)");
      files.push_back(safetensors::File::parse(path, std::move(bytes)));
    }
    // A checksum proves the file is what was written, not that what was written makes sense:
    // the values a resume acts on are checked too.
    auto bad = [&](const std::string& what) {
      return InputError(state_path + ": " + what + " (a checkpoint mpt did not write)");
    };
    // Counters are whole numbers >= 0 (a 10.5 or a -1 would be cut or wrapped by get<>()).
    auto counter = [&](const nlohmann::json& v, const std::string& key) {
      if (!v.is_number_unsigned())
        throw bad(key + " " + v.dump() + " is not a whole number >= 0");
      return v.get<uint64_t>();
    };
    CheckpointState st;
    st.step = static_cast<int64_t>(counter(j.at("step"), "step"));
    st.tokens = static_cast<int64_t>(counter(j.at("tokens"), "tokens"));
    st.optimizer_step = static_cast<int64_t>(counter(j.at("optimizer_step"), "optimizer_step"));
    st.data_epoch = counter(j.at("data").at("epoch"), "data.epoch");
    st.data_sample = counter(j.at("data").at("sample"), "data.sample");
    st.config = j.at("config");
    st.numerics = j.value("numerics", nlohmann::json());
    if (j.contains("eval_pending")) {  // absent from checkpoints written before it existed
      if (!j["eval_pending"].is_boolean())
        throw bad("eval_pending " + j["eval_pending"].dump() + " is not true or false");
      st.eval_pending = j["eval_pending"].get<bool>();
    }
    if (st.step < 0 || st.tokens < 0 || st.optimizer_step < 0 || st.optimizer_step > st.step)
      throw bad("step " + std::to_string(st.step) + ", tokens " + std::to_string(st.tokens) +
                " and optimizer step " + std::to_string(st.optimizer_step) +
                " must be >= 0, the optimizer step at most the step");
    int64_t named = 0;
    if (parse_step_name(base, &named) && named != st.step)
      throw bad("step " + std::to_string(st.step) + " in a directory named " + base);
    if (!st.config.is_object()) throw bad("config is not an object");
    if (j.contains("world_size") &&
        (!j["world_size"].is_number_integer() || j["world_size"].get<int64_t>() < 1))
      throw bad("world_size " + j["world_size"].dump() + " is not a positive integer");
    for (const char* key : {"mpt_version", "precision"})
      if (j.contains(key) && !j[key].is_string())
        throw bad(std::string(key) + " " + j[key].dump() + " is not a string");
    return Checkpoint{dir, std::move(st), j, std::move(files[0]), std::move(files[1])};
  } catch (const nlohmann::json::exception& e) {
    throw InputError(state_path + ": missing or malformed field (" + e.what() + ")");
  }
}

std::string describe_checkpoint(const std::string& dir) {
  const Checkpoint c = load_checkpoint(dir);
  std::ostringstream o;
  o << "checkpoint  " << dir << "\n";
  o << "step        " << c.state.step << " (" << c.state.tokens << " tokens, optimizer step "
    << c.state.optimizer_step << ")\n";
  o << "data        train cursor: epoch " << c.state.data_epoch << ", sample "
    << c.state.data_sample << "\n";
  if (c.state.eval_pending)
    o << "eval        pending: a stop cut this step's evaluation short; a resume runs it first\n";
  o << "written by  mpt " << c.state_json.value("mpt_version", "?") << ", precision "
    << c.state_json.value("precision", "?") << ", world size "
    << c.state_json.value("world_size", 1) << "\n";
  o << "files       (all checksums verified)\n";
  for (const char* name : {kModelFile, kOptimizerFile}) {
    const auto& f = c.state_json["files"][name];
    o << "  " << name << "  " << f["bytes"].get<uint64_t>() << " bytes  xxh3_64 "
      << f["xxh3_64"].get<std::string>() << "\n";
  }
  for (const auto* file : {&c.model, &c.optimizer}) {
    o << "tensors in " << fs::path(file->path()).filename().string() << " ("
      << file->entries().size() << "):\n";
    for (const auto& e : file->entries())
      o << "  " << e.name << "  " << safetensors::format_name(e.dtype) << e.shape.str() << "\n";
  }
  return o.str();
}

CheckpointManager::CheckpointManager(const std::string& run_dir, const CheckpointConfig& cfg,
                                     FaultPlan faults)
    : dir_((fs::path(run_dir) / "checkpoints").string()), cfg_(cfg), faults_(std::move(faults)) {}

std::string CheckpointManager::save(const CheckpointState& state,
                                    const std::vector<safetensors::TensorRef>& model,
                                    const std::vector<safetensors::TensorRef>& optimizer) {
  std::error_code ec;
  if (!fs::exists(dir_, ec)) {
    fs::create_directories(dir_, ec);
    if (ec) throw RuntimeError(dir_ + ": cannot create: " + ec.message());
    sync_directory(fs::path(dir_).parent_path().string());  // the new checkpoints/ entry itself
  }
  // Leftovers of a save that crashed are never read; clear them now.
  for (const auto& e : fs::directory_iterator(dir_, ec))
    if (e.path().filename().string().rfind(kTmpPrefix, 0) == 0) fs::remove_all(e.path(), ec);

  saving_step_ = state.step;
  const std::string name = step_name(state.step);
  const fs::path tmp = fs::path(dir_) / (kTmpPrefix + name), final_dir = fs::path(dir_) / name;
  auto hook = [this](size_t written, size_t chunk) -> int {
    if (faults_.crash_point == "in_file" && written > 0) faults_.crash_if("in_file", saving_step_);
    if (faults_.enospc_after >= 0 && bytes_written_ + int64_t(chunk) > faults_.enospc_after)
      return ENOSPC;
    bytes_written_ += int64_t(chunk);
    return 0;
  };
  try {
    fs::create_directories(tmp);
    const std::map<std::string, std::string> meta = {{"format", "mpt"},
                                                     {"step", std::to_string(state.step)}};
    const safetensors::Written written[2] = {
        safetensors::write((tmp / kModelFile).string(), model, meta, hook),
        safetensors::write((tmp / kOptimizerFile).string(), optimizer, meta, hook)};
    nlohmann::json j = {{"format", "mpt-checkpoint"},
                        {"format_version", kFormatVersion},
                        {"mpt_version", MPT_VERSION},
                        {"step", state.step},
                        {"tokens", state.tokens},
                        {"optimizer_step", state.optimizer_step},
                        {"schedule_step", state.step},
                        {"data", {{"epoch", state.data_epoch}, {"sample", state.data_sample}}},
                        {"precision", state.config.value("precision", "fp32")},
                        {"world_size", state.world_size},
                        {"eval_pending", state.eval_pending},
                        {"config", state.config},
                        {"train_data", state.train_data},
                        {"numerics", state.numerics}};
    const char* names[2] = {kModelFile, kOptimizerFile};
    for (int f = 0; f < 2; ++f)
      j["files"][names[f]] = {{"bytes", written[f].bytes}, {"xxh3_64", hex64(written[f].xxh3)}};
    j["state_checksum"] = content_checksum(j);
    const std::string text = j.dump(2) + "\n";
    write_file_atomic((tmp / kStateFile).string(), {ByteSpan{text.data(), text.size()}}, hook);
    sync_directory(tmp.string());
    faults_.crash_if("before_rename", saving_step_);
    // The same step is saved again when a run replays steps after a crash that left this one
    // committed but not `latest` (restart_from deletes those newer than the resume point, so
    // this is rare): the old one is set aside, the new one renamed in, then the old one goes.
    const fs::path aside = fs::path(dir_) / (kTmpPrefix + name + ".old");
    const bool replacing = fs::exists(final_dir);
    if (replacing) fs::rename(final_dir, aside);
    try {
      fs::rename(tmp, final_dir);
    } catch (...) {
      if (replacing) fs::rename(aside, final_dir, ec);
      throw;
    }
    sync_directory(dir_);
    if (replacing) fs::remove_all(aside, ec);
  } catch (const std::exception& e) {
    fs::remove_all(tmp, ec);
    throw RuntimeError("checkpoint at step " + std::to_string(state.step) + " not saved: " +
                       e.what());
  }
  try {
    write_latest(name);
  } catch (const std::exception& e) {
    throw RuntimeError("checkpoint at step " + std::to_string(state.step) + " was committed as " +
                       final_dir.string() + " but `latest` could not be moved to it: " + e.what());
  }
  apply_retention(state.step);
  return final_dir.string();
}

void CheckpointManager::write_latest(const std::string& name) {
  // Written in two pieces so that the crash-injection test can land between them.
  const std::string head = "step_", tail = name.substr(5) + "\n";
  write_file_atomic((fs::path(dir_) / kLatest).string(),
                    {ByteSpan{head.data(), head.size()}, ByteSpan{tail.data(), tail.size()}},
                    [this](size_t written, size_t) {
                      if (written > 0) faults_.crash_if("in_latest", saving_step_);
                      return 0;
                    });
}

void CheckpointManager::restart_from(const std::string& dir) {
  const std::string name = fs::path(dir).lexically_normal().filename().empty()
                               ? fs::path(dir).lexically_normal().parent_path().filename().string()
                               : fs::path(dir).lexically_normal().filename().string();
  int64_t step = 0;
  MPT_CHECK(parse_step_name(name, &step), "restart_from: not a checkpoint directory: " + dir);
  write_latest(name);
  std::error_code ec;
  for (const auto& [s, path] : committed_steps(dir_)) {
    if (s <= step) continue;
    fs::remove(path / kStateFile, ec);  // first, as in apply_retention
    fs::remove_all(path, ec);
  }
}

void CheckpointManager::apply_retention(int64_t newest_step) {
  const auto steps = committed_steps(dir_);
  int kept = 0;
  std::error_code ec;
  // Kept permanently: under this run's keep_every, or under the one the checkpoint was written
  // with (its state.json's config), so that a resume that changes or drops the key does not
  // delete what an earlier part of the run promised to keep.
  // (Not step 0, the untrained model a stop during the first evaluation saves.)
  auto kept_by = [](int64_t step, int64_t every) {
    return every > 0 && step > 0 && step % every == 0;
  };
  // Whether the checkpoint's own state.json says to keep it. Without a state.json (a deletion
  // cut short) it is not kept; one that cannot be read or parsed now is kept (not deleted on a
  // doubt).
  auto kept_when_written = [&](int64_t step, const fs::path& path) {
    try {
      const std::optional<std::string> text = read_small_file((path / kStateFile).string());
      if (!text) return false;
      const nlohmann::json j = nlohmann::json::parse(*text, nullptr, false);
      if (!j.is_object()) return true;
      const nlohmann::json every =
          j.value("config", nlohmann::json::object()).value("checkpoint", nlohmann::json::object())
              .value("keep_every", nlohmann::json());
      return every.is_number_integer() && kept_by(step, every.get<int64_t>());
    } catch (const std::exception&) {
      return true;
    }
  };
  for (const auto& [step, path] : steps) {
    const bool recent = step == newest_step || kept < cfg_.keep_last;
    if (recent) ++kept;
    if (recent || kept_by(step, cfg_.keep_every) || kept_when_written(step, path)) continue;
    // state.json first: a deletion cut short leaves a directory that plainly fails to verify.
    fs::remove(path / kStateFile, ec);
    faults_.crash_if("in_delete", saving_step_);
    fs::remove_all(path, ec);
  }
}

Checkpoint CheckpointManager::load_latest(const std::string& run_dir) {
  const fs::path dir = fs::path(run_dir) / "checkpoints";
  const fs::path latest = dir / kLatest;
  std::optional<std::string> text;
  try {
    text = read_small_file(latest.string());
  } catch (const InputError& e) {
    throw InputError(std::string(e.what()) + fallback_hint(dir, INT64_MAX));
  }
  if (!text)
    throw InputError(latest.string() + ": missing: the run has no committed checkpoint" +
                     fallback_hint(dir, INT64_MAX));
  const std::string name = text->substr(0, text->find('\n'));
  int64_t step = 0;
  if (!parse_step_name(name, &step))
    throw InputError(latest.string() + ": does not name a checkpoint (holds '" + name + "')" +
                     fallback_hint(dir, INT64_MAX));
  try {
    return load_checkpoint((dir / name).string());
  } catch (const InputError& e) {
    throw InputError(std::string(e.what()) + fallback_hint(dir, step));
  }
}

}  // namespace mpt
