// What the machine offers: CPU ISA, the cores this process may actually use, caches, memory, and
// (filled in by the CUDA backend when it is built) the GPUs. Probed once through pytorch's cpuinfo.
#pragma once
#include <cstddef>
#include <string>
#include <utility>
#include <vector>

namespace hybrit {

enum class SimdLevel { scalar = 0, avx2 = 1, avx512 = 2 };
inline constexpr int kSimdLevelCount = 3;
const char* to_string(SimdLevel level);
// "scalar" | "avx2" | "avx512"; throws Error(invalid_argument) naming `what` otherwise.
SimdLevel parse_simd_level(const std::string& text, const std::string& what);

struct CudaDeviceInfo {
  int index = 0;
  std::string name;
  int compute_major = 0, compute_minor = 0;
  size_t memory_bytes = 0;
  int multiprocessors = 0;
};

struct HardwareInfo {
  std::string cpu_model;
  bool avx2 = false, fma = false, avx512f = false, avx512bw = false, avx512vl = false,
       avx512dq = false, avx512vnni = false, avxvnni = false;
  bool amx_int8 = false;  // AMX-TILE and AMX-INT8 (the OS must still grant the tile state: backends/c)
  // The flags above by name, in this order: what `hybrit info`, the report and Python list.
  std::vector<std::pair<const char*, bool>> isa_flags() const {
    return {{"avx2", avx2},         {"fma", fma},         {"avx512f", avx512f}, {"avx512bw", avx512bw}, {"avx512vl", avx512vl},
            {"avx512dq", avx512dq}, {"avx512vnni", avx512vnni}, {"avxvnni", avxvnni}, {"amx-int8", amx_int8}};
  }
  int logical_cpus = 1;   // what the OS reports
  int physical_cores = 1;
  // The affinity mask, capped by a cgroup CPU quota; when an MPI launcher started several of a
  // job's processes here without binding them, this process's share of them.
  int granted_cpus = 1;
  int ranks_on_node = 1;  // the job's processes on this machine (1 without a launcher)
  size_t l1d_bytes = 0, l2_bytes = 0, l3_bytes = 0;
  size_t memory_total_bytes = 0, memory_available_bytes = 0;  // available: this process's share, like granted_cpus
  std::vector<CudaDeviceInfo> cuda_devices;
  std::string cuda_status = "CUDA backend not probed";  // why there is no GPU, when there is none

  // Best SIMD level this CPU can run (AVX-512 needs F+BW+VL+DQ; AVX2 needs FMA as well).
  SimdLevel best_simd() const;
  // Identifies the hardware a measured profile belongs to: CPU model, ISA, granted CPUs, GPUs.
  std::string fingerprint() const;
};

// CPU side of the probe, cached after the first call; cuda_devices stays empty here.
const HardwareInfo& cpu_hardware();

std::string format_bytes(double bytes);
// The most resident memory this process has held so far (VmHWM), in bytes.
size_t peak_rss_bytes();
// "12.3 us", "4.56 ms", "7.89 s"; "n/a" for a non-finite value.
std::string format_seconds(double seconds);

}  // namespace hybrit
