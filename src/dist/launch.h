// Where this process sits in a job, read from the launcher's environment: `mpirun` (Open MPI),
// MPICH's and Intel MPI's Hydra (PMI), and SLURM's `srun`. A plain `mpt train` is a world of
// one and needs no MPI runtime at all.
#pragma once

#include <functional>
#include <string>

namespace mpt::dist {

struct Placement {
  int rank = 0;        // in the whole job, 0 .. world_size-1
  int local_rank = 0;  // on this node: picks the GPU on the CUDA backend
  int world_size = 1;
  std::string launcher = "none";  // "openmpi", "pmi", "slurm" or "none"
};

// Reads the variables of the first launcher found, in this order: Open MPI (OMPI_COMM_WORLD_RANK,
// _SIZE, _LOCAL_RANK), PMI (PMI_RANK, PMI_SIZE, MPI_LOCALRANKID), SLURM's srun (SLURM_PROCID,
// SLURM_STEP_NUM_TASKS, SLURM_LOCALID; a batch script outside srun is one process). A launcher is
// found by its rank variable (srun's by SLURM_STEP_NUM_TASKS); the others must then be set too.
// Values that are not integers, or a rank outside [0, size), are an InputError naming the
// variable and its value. `env` looks a variable up (nullptr when unset).
Placement detect_placement(const std::function<const char*(const char*)>& env);
Placement detect_placement();  // from the process environment

}  // namespace mpt::dist
