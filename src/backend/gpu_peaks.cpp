#include "backend/gpu_peaks.h"

namespace mpt {

std::string matmul_peak_format(MatmulPrecision matmul, DType activation) {
  if (matmul == MatmulPrecision::fp8) return "fp8";
  if (activation == DType::f16) return "fp16";
  if (activation == DType::bf16) return "bf16";
  return matmul == MatmulPrecision::tf32 ? "tf32" : "fp32";
}

namespace {
struct Peaks {
  const char* name_part;  // matched as a substring of cudaDeviceProp::name
  double fp32, tf32, fp16, bf16, fp8;  // TFLOP/s, dense
  double tbps;                         // memory bandwidth, TB/s
};
// Order matters: the more specific names first ("H100 PCIe" before "H100").
constexpr Peaks kPeaks[] = {
    // NVL boards ("H100 NVL", "H200 NVL") have lower clocks and power than the SXM parts whose
    // names they contain, and the sources we checked disagree on their dense peaks: unknown (no
    // MFU) rather than the SXM figures.
    {"NVL", 0.0, 0.0, 0.0, 0.0, 0.0, 0.0},
    // Grace Hopper ("NVIDIA GH200 480GB") contains "H200" but comes with other memory (HBM3 or
    // HBM3e, 4.0 or 4.9 TB/s) and power limits: unknown rather than the H200's figures.
    {"GH200", 0.0, 0.0, 0.0, 0.0, 0.0, 0.0},
    {"H200", 67.0, 494.7, 989.4, 989.4, 1978.9, 4.8},
    {"H100 PCIe", 51.0, 378.0, 756.0, 756.0, 1513.0, 2.0},
    {"H100", 67.0, 494.7, 989.4, 989.4, 1978.9, 3.35},
    // The A100's compute is the same in every variant; its memory is not.
    {"A100-SXM4-80GB", 19.5, 156.0, 312.0, 312.0, 0.0, 2.039},
    {"A100 80GB PCIe", 19.5, 156.0, 312.0, 312.0, 0.0, 1.935},
    {"A100", 19.5, 156.0, 312.0, 312.0, 0.0, 1.555},
};

const Peaks* find_gpu(const std::string& device_name) {
  for (const Peaks& p : kPeaks)
    if (device_name.find(p.name_part) != std::string::npos) return &p;
  return nullptr;
}
}  // namespace

double peak_flops(const std::string& device_name, const std::string& format) {
  const Peaks* p = find_gpu(device_name);
  if (!p) return 0.0;
  double t = 0;
  if (format == "fp32") t = p->fp32;
  else if (format == "tf32") t = p->tf32;
  else if (format == "fp16") t = p->fp16;
  else if (format == "bf16") t = p->bf16;
  else if (format == "fp8") t = p->fp8;
  return t * 1e12;
}

double peak_bandwidth(const std::string& device_name) {
  const Peaks* p = find_gpu(device_name);
  return p ? p->tbps * 1e12 : 0.0;
}

const char* known_gpu_names() {
  return "NVIDIA H200, NVIDIA H100 (SXM), NVIDIA H100 PCIe, NVIDIA A100-SXM4-80GB, "
         "NVIDIA A100 80GB PCIe, NVIDIA A100 (40GB); a name containing one of H200, H100 PCIe, "
         "H100, A100 (NVL boards and GH200: unknown)";
}

PolicyPeak policy_peak(const std::string& device_name, MatmulPrecision matmul, DType activation) {
  PolicyPeak p;
  p.format = matmul_peak_format(matmul, activation);
  p.flops = device_name.empty() ? 0.0 : peak_flops(device_name, p.format);
  return p;
}

std::optional<double> model_flops_utilization(double flops_per_token, double tokens_per_s,
                                              double peak_flops, int devices) {
  if (!(peak_flops > 0) || devices < 1) return std::nullopt;
  return flops_per_token * tokens_per_s / (peak_flops * devices);
}

}  // namespace mpt
