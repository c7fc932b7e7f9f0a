// Dense peak matmul throughput of known NVIDIA GPUs by format, for MFU (model FLOPs
// utilisation). Plain C++: the trainer and the benchmarks use it, and it is tested without a GPU.
#pragma once

#include <optional>
#include <string>

#include "backend/backend.h"

namespace mpt {

// The format whose peak bounds a precision policy's matmuls: "fp32" (CUDA cores: cuBLAS runs fp32
// GEMMs without Tensor Cores), "tf32", "fp16", "bf16" or "fp8" (Tensor Cores).
// `matmul` and `activation` are the policy's (the dtype the matmul operands are stored in).
std::string matmul_peak_format(MatmulPrecision matmul, DType activation);

// Dense (no structured sparsity) peak FLOP/s of `format` on the GPU named `device_name` (as
// cudaDeviceProp::name reports it), 0 when the GPU or the format is not in the table. Figures from
// NVIDIA's datasheets: H100 SXM5 and H200 SXM (the same compute): fp32 67 TFLOP/s, tf32 494.7,
// fp16/bf16 989.4, fp8 1978.9; H100 PCIe: 51, 378, 756, 1513; A100 (SXM4/PCIe): 19.5, 156, 312, -
// (the datasheets give the Tensor Core figures "with sparsity" as twice these).
double peak_flops(const std::string& device_name, const std::string& format);

// Datasheet memory bandwidth (bytes/s) of the GPU named `device_name`, 0 when not in the table:
// H200 SXM 4.8 TB/s, H100 SXM5 3.35, H100 PCIe 2.0, A100 80GB SXM4 2.039, A100 80GB PCIe 1.935,
// A100 40GB 1.555.
double peak_bandwidth(const std::string& device_name);
// The names the two tables know, for error messages.
const char* known_gpu_names();

// The dense peak that bounds a policy's matmuls on a GPU: its format (matmul_peak_format) and
// FLOP/s (peak_flops; 0 when the GPU or the format is not in the table, or device_name is "").
struct PolicyPeak {
  std::string format;
  double flops = 0;
};
PolicyPeak policy_peak(const std::string& device_name, MatmulPrecision matmul, DType activation);

// Model FLOPs utilisation of `devices` GPUs together processing `tokens_per_s` tokens/s at
// `flops_per_token` (Gpt::flops_per_token): the achieved FLOP/s over devices x peak. Empty when
// the peak is unknown (0), so that no record carries a made-up figure.
std::optional<double> model_flops_utilization(double flops_per_token, double tokens_per_s,
                                              double peak_flops, int devices = 1);

}  // namespace mpt
