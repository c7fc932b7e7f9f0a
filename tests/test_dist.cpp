// Data-parallel groundwork that needs no MPI: where a process sits in a job, from the
// launcher's environment.
#include <gtest/gtest.h>

#include <map>
#include <string>

#include "core/error.h"
#include "dist/launch.h"

namespace mpt::dist {
namespace {

Placement from(const std::map<std::string, std::string>& vars) {
  return detect_placement([&](const char* name) -> const char* {
    auto it = vars.find(name);
    return it == vars.end() ? nullptr : it->second.c_str();
  });
}

TEST(Launch, NoLauncherIsAWorldOfOne) {
  const Placement p = from({{"HOME", "/root"}});
  EXPECT_EQ(p.rank, 0);
  EXPECT_EQ(p.local_rank, 0);
  EXPECT_EQ(p.world_size, 1);
  EXPECT_EQ(p.launcher, "none");
}

TEST(Launch, OpenMpi) {
  const Placement p = from({{"OMPI_COMM_WORLD_RANK", "5"},
                            {"OMPI_COMM_WORLD_SIZE", "16"},
                            {"OMPI_COMM_WORLD_LOCAL_RANK", "1"}});
  EXPECT_EQ(p.rank, 5);
  EXPECT_EQ(p.world_size, 16);
  EXPECT_EQ(p.local_rank, 1);
  EXPECT_EQ(p.launcher, "openmpi");
}

TEST(Launch, HydraPmiAndSlurm) {
  Placement p = from({{"PMI_RANK", "3"}, {"PMI_SIZE", "4"}, {"MPI_LOCALRANKID", "3"}});
  EXPECT_EQ(p.launcher, "pmi");
  EXPECT_EQ(p.rank, 3);
  EXPECT_EQ(p.local_rank, 3);
  p = from({{"SLURM_PROCID", "9"}, {"SLURM_NTASKS", "16"}, {"SLURM_STEP_NUM_TASKS", "16"},
            {"SLURM_LOCALID", "1"}});
  EXPECT_EQ(p.launcher, "slurm");
  EXPECT_EQ(p.rank, 9);
  EXPECT_EQ(p.world_size, 16);
  EXPECT_EQ(p.local_rank, 1);
}

TEST(Launch, ASlurmBatchScriptIsOneProcess) {
  // sbatch --ntasks=4 runs the script once, with the allocation's variables but no job step.
  const Placement p = from({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "4"}, {"SLURM_JOB_ID", "7"}});
  EXPECT_EQ(p.launcher, "none");
  EXPECT_EQ(p.world_size, 1);
}

TEST(Launch, OpenMpiWinsOverTheSlurmAllocationItRunsIn) {
  // mpirun inside an salloc: SLURM_* describe the allocation, OMPI_* the job.
  const Placement p = from({{"SLURM_PROCID", "0"},
                            {"SLURM_NTASKS", "1"},
                            {"OMPI_COMM_WORLD_RANK", "2"},
                            {"OMPI_COMM_WORLD_SIZE", "4"}});
  EXPECT_EQ(p.launcher, "openmpi");
  EXPECT_EQ(p.rank, 2);
  EXPECT_EQ(p.local_rank, 0) << "an unset local rank is 0";
}

TEST(Launch, BadValuesNameTheVariable) {
  auto message = [](const std::map<std::string, std::string>& vars) -> std::string {
    try {
      from(vars);
    } catch (const InputError& e) {
      return e.what();
    }
    return "(no error)";
  };
  EXPECT_NE(message({{"PMI_RANK", "x"}, {"PMI_SIZE", "2"}}).find("PMI_RANK='x'"), std::string::npos);
  EXPECT_NE(message({{"PMI_RANK", "2"}, {"PMI_SIZE", "2"}}).find("not below PMI_SIZE=2"),
            std::string::npos);
  EXPECT_NE(message({{"SLURM_STEP_NUM_TASKS", "2"}}).find("SLURM_PROCID is not"),
            std::string::npos);
  EXPECT_NE(message({{"OMPI_COMM_WORLD_RANK", "0"}, {"OMPI_COMM_WORLD_SIZE", "0"}})
                .find("OMPI_COMM_WORLD_SIZE='0'"),
            std::string::npos);
  EXPECT_NE(message({{"OMPI_COMM_WORLD_RANK", "-1"}, {"OMPI_COMM_WORLD_SIZE", "2"}})
                .find("is not an integer >= 0"),
            std::string::npos);
}

}  // namespace
}  // namespace mpt::dist
