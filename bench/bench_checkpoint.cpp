// Checkpoint speed on a GPT-2 124M-shaped model (configs/gpt2-124m.yaml): the time to save (the
// whole commit: write, fsync, rename, `latest`) and to load and verify a checkpoint, against the
// disk's own sequential write speed measured in the same run (the same bytes written with
// write() and fsync), and the fraction of training time checkpointing takes at the config's
// cadence.
//
//   bench_checkpoint [--dir DIR] [--precision NAME] [--repeats N] [--threads N]
//
// DIR (default /tmp/mpt-bench-checkpoint) is created and removed; put it on the disk you train on.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "config/config.h"
#include "core/error.h"
#include "data/corpus.h"
#include "io/checkpoint.h"
#include "model/gpt.h"
#include "optim/adamw.h"
#include "precision/policy.h"
#include "train/checkpoint_tensors.h"

using namespace mpt;
namespace fs = std::filesystem;

namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}
double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// The disk's sequential write speed for `bytes`: 8 MiB writes, then fsync, as a checkpoint does.
double disk_write_seconds(const std::string& path, size_t bytes) {
  std::vector<char> chunk(8 << 20, 'x');
  const auto t0 = Clock::now();
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  MPT_CHECK(fd >= 0, "cannot create " + path);
  for (size_t done = 0; done < bytes;) {
    const size_t n = std::min(chunk.size(), bytes - done);
    const ssize_t w = ::write(fd, chunk.data(), n);
    MPT_CHECK(w > 0, "write failed on " + path);
    done += static_cast<size_t>(w);
  }
  MPT_CHECK(::fsync(fd) == 0, "fsync failed on " + path);
  ::close(fd);
  const double s = since(t0);
  fs::remove(path);
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir = "/tmp/mpt-bench-checkpoint", precision = "fp32";
  int repeats = 3, threads = 2;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--dir") dir = v;
    else if (k == "--precision") precision = v;
    else if (k == "--repeats") repeats = std::max(1, std::atoi(v.c_str()));
    else if (k == "--threads") threads = std::max(1, std::atoi(v.c_str()));
    else {
      std::fprintf(stderr, "unknown option %s\n", k.c_str());
      return 2;
    }
  }
  try {
    const Config cfg = load_config(std::string(MPT_SOURCE_DIR) + "/configs/gpt2-124m.yaml",
                                   // The shape is what matters; the built-in corpus stands in
                                   // for the FineWeb shards the config names.
                                   {"precision=" + precision, "data.train=[builtin]",
                                    "data.val=[builtin]"});
    const PrecisionPolicy policy = PrecisionPolicy::from_config(cfg);
    CpuBackend be(threads);
    Gpt model(cfg.model, be, policy);
    model.init_weights(cfg.model.init_seed, cfg.model.init_std);
    AdamW opt(cfg.optimizer, model, be);
    fs::remove_all(dir);
    fs::create_directories(dir);
    CheckpointConfig keep;
    keep.every = cfg.checkpoint.every;
    keep.keep_last = 1;
    CheckpointManager manager(dir, keep, FaultPlan{});

    std::vector<double> save_s, copy_s, load_s, disk_s;
    size_t bytes = 0;
    for (int r = 0; r < repeats; ++r) {
      // The host copy is part of a save's cost (a GPU backend's device-to-host copy).
      auto t0 = Clock::now();
      const CheckpointTensors h = checkpoint_tensors(be, model, opt);
      copy_s.push_back(since(t0));
      CheckpointState st;
      st.step = r + 1;
      st.config = config_to_json(cfg);
      const std::string saved = manager.save(st, h.weights, h.moments);
      save_s.push_back(since(t0));
      bytes = 0;
      for (const auto& e : fs::directory_iterator(saved))
        if (e.is_regular_file()) bytes += static_cast<size_t>(e.file_size());
      // Load: read, verify every checksum, copy into the model and the optimizer.
      t0 = Clock::now();
      restore_tensors(be, model, opt, load_checkpoint(saved));
      load_s.push_back(since(t0));
      disk_s.push_back(disk_write_seconds(dir + "/disk-speed.bin", bytes));
    }

    // Training throughput of this model on this backend, one micro-batch of the config's shape,
    // to put the checkpoint time against the time between checkpoints.
    const int B = cfg.training.micro_batch, T = cfg.training.seq_len;
    const auto& corpus = data::builtin_corpus_tokens(data::Split::train);
    std::vector<int32_t> in(static_cast<size_t>(B) * T), tg(in.size());
    for (size_t i = 0; i < in.size(); ++i) {
      in[i] = corpus[i % (corpus.size() - 1)];
      tg[i] = corpus[i % (corpus.size() - 1) + 1];
    }
    auto micro = [&] {
      model.forward(in.data(), tg.data(), B, T, 1.0f / (B * T));
      model.backward();
    };
    micro();  // warm-up
    const auto t0 = Clock::now();
    micro();
    const double micro_s = since(t0);
    const double tokens_per_step = double(B) * T * cfg.training.grad_accum;
    const double step_s = micro_s * cfg.training.grad_accum;  // the optimizer step is negligible

    const double mib = double(bytes) / (1 << 20);
    std::printf("model: GPT-2 124M shape (configs/gpt2-124m.yaml), %lld parameters, precision %s\n",
                static_cast<long long>(model.num_params()), precision.c_str());
    std::printf("checkpoint: %.1f MiB (model + optimizer + state.json); median of %d\n", mib,
                repeats);
    std::printf("  save (host copy, write, fsync, rename, latest)  %7.2f s  %7.1f MiB/s\n",
                median(save_s), mib / median(save_s));
    std::printf("    of which the host copy%s                  %7.2f s\n",
                be.host_accessible() ? " (none: CPU memory)" : "                   ",
                median(copy_s));
    std::printf("  disk: the same bytes, write + fsync             %7.2f s  %7.1f MiB/s\n",
                median(disk_s), mib / median(disk_s));
    std::printf("  save speed / disk speed                         %7.2f\n",
                median(disk_s) / median(save_s));
    std::printf("  load (read, verify checksums, copy in)          %7.2f s  %7.1f MiB/s\n",
                median(load_s), mib / median(load_s));
    std::printf("training: one micro-batch (%d x %d tokens) forward+backward %.2f s on %s\n", B,
                T, micro_s, be.device_description().c_str());
    std::printf("  a step of %.0f tokens (grad_accum %d) takes about %.0f s here\n",
                tokens_per_step, cfg.training.grad_accum, step_s);
    std::printf("  checkpoint.every = %lld steps: checkpointing is %.4f%% of training time\n",
                static_cast<long long>(cfg.checkpoint.every),
                100.0 * median(save_s) / (cfg.checkpoint.every * step_s + median(save_s)));
    fs::remove_all(dir);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_checkpoint: %s\n", e.what());
    return 1;
  }
  return 0;
}
