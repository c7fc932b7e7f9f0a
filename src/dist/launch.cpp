#include "dist/launch.h"

#include <cerrno>
#include <cstdlib>

#include "core/error.h"

namespace mpt::dist {
namespace {

struct LauncherVars {
  const char* launcher;
  const char* marker;  // set only in processes this launcher started
  const char* rank;
  const char* size;
  const char* local_rank;  // optional: 0 when unset
};

// SLURM's batch script also has SLURM_PROCID=0 and SLURM_NTASKS = the allocation's task count,
// though it is one process: only a job step started by srun has SLURM_STEP_NUM_TASKS, and its
// size is the step's.
constexpr LauncherVars kLaunchers[] = {
    {"openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
     "OMPI_COMM_WORLD_LOCAL_RANK"},
    {"pmi", "PMI_RANK", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"},
    {"slurm", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"},
};

int parse_int(const char* name, const char* value, int min) {
  char* end = nullptr;
  errno = 0;
  const long v = std::strtol(value, &end, 10);
  if (errno || end == value || *end != '\0' || v < min || v > 1 << 24)
    throw InputError(std::string("launcher environment: ") + name + "='" + value +
                     "' is not an integer >= " + std::to_string(min));
  return static_cast<int>(v);
}

}  // namespace

Placement detect_placement(const std::function<const char*(const char*)>& env) {
  for (const LauncherVars& l : kLaunchers) {
    if (!env(l.marker)) continue;
    const char* rank = env(l.rank);
    const char* size = env(l.size);
    if (!rank || !size)
      throw InputError(std::string("launcher environment: ") + l.marker + " is set but " +
                       (!rank ? l.rank : l.size) + " is not");
    Placement p;
    p.launcher = l.launcher;
    p.rank = parse_int(l.rank, rank, 0);
    p.world_size = parse_int(l.size, size, 1);
    if (p.rank >= p.world_size)
      throw InputError(std::string("launcher environment: ") + l.rank + "=" + rank +
                       " is not below " + l.size + "=" + size);
    const char* local = env(l.local_rank);
    p.local_rank = local ? parse_int(l.local_rank, local, 0) : 0;
    return p;
  }
  return Placement{};
}

Placement detect_placement() {
  return detect_placement([](const char* name) { return std::getenv(name); });
}

}  // namespace mpt::dist
