#include "core/hardware.hpp"
#include "core/comm.hpp"
#include "core/names.hpp"

#include <cpuid.h>
#include <cpuinfo.h>
#include <sched.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "core/error.hpp"
#include "core/hash.hpp"

namespace hybrit {

static const char* const kSimdNames[] = {"scalar", "avx2", "avx512"};  // in enum order
static_assert(sizeof(kSimdNames) / sizeof(kSimdNames[0]) == kSimdLevelCount, "one name per SIMD level");

const char* to_string(SimdLevel level) { return kSimdNames[int(level)]; }

SimdLevel parse_simd_level(const std::string& text, const std::string& what) { return parse_name<SimdLevel>(kSimdNames, text, what); }

SimdLevel HardwareInfo::best_simd() const {
  if (avx512f && avx512bw && avx512vl && avx512dq && fma) return SimdLevel::avx512;
  if (avx2 && fma) return SimdLevel::avx2;
  return SimdLevel::scalar;
}

std::string HardwareInfo::fingerprint() const {
  std::ostringstream s;
  s << cpu_model << "|simd=" << to_string(best_simd()) << "|cpus=" << granted_cpus;
  for (const auto& d : cuda_devices) s << "|gpu=" << d.name << ":" << d.compute_major << d.compute_minor;
  const std::string text = s.str();
  const uint64_t h = fnv1a64(text.data(), text.size());
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(h));
  return hex;
}

std::string format_seconds(double s) {
  char buf[32];
  if (!std::isfinite(s)) return "n/a";
  if (s < 1e-3) std::snprintf(buf, sizeof buf, "%.1f us", s * 1e6);
  else if (s < 1.0) std::snprintf(buf, sizeof buf, "%.2f ms", s * 1e3);
  else std::snprintf(buf, sizeof buf, "%.2f s", s);
  return buf;
}

std::string format_bytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (bytes >= 1024 && u < 4) { bytes /= 1024; ++u; }
  char buf[32];
  std::snprintf(buf, sizeof buf, u ? "%.1f %s" : "%.0f %s", bytes, units[u]);
  return buf;
}

namespace {

// cgroup v2 "max 100000" / "200000 100000": a container may be granted fewer CPUs than its
// affinity mask shows.
int cgroup_cpu_limit() {
  std::ifstream f("/sys/fs/cgroup/cpu.max");
  std::string quota, period;
  if (!(f >> quota >> period) || quota == "max") return 0;
  double q = std::atof(quota.c_str()), p = std::atof(period.c_str());
  return p > 0 ? std::max(1, static_cast<int>(std::ceil(q / p))) : 0;
}

size_t meminfo_kib(const std::string& key) {
  std::ifstream f("/proc/meminfo");
  std::string name;
  size_t value = 0;
  std::string unit;
  while (f >> name >> value >> unit)
    if (name == key + ":") return value * 1024;
  return 0;
}

size_t cgroup_memory_limit() {
  std::ifstream f("/sys/fs/cgroup/memory.max");
  std::string v;
  if (!(f >> v) || v == "max") return 0;
  return static_cast<size_t>(std::atoll(v.c_str()));
}

HardwareInfo probe_cpu() {
  HardwareInfo hw;
  if (cpuinfo_initialize()) {
    if (const cpuinfo_package* pkg = cpuinfo_get_package(0)) hw.cpu_model = pkg->name;
    hw.avx2 = cpuinfo_has_x86_avx2();
    hw.fma = cpuinfo_has_x86_fma3();
    hw.avx512f = cpuinfo_has_x86_avx512f();
    hw.avx512bw = cpuinfo_has_x86_avx512bw();
    hw.avx512vl = cpuinfo_has_x86_avx512vl();
    hw.avx512dq = cpuinfo_has_x86_avx512dq();
    hw.avx512vnni = cpuinfo_has_x86_avx512vnni();
    hw.logical_cpus = static_cast<int>(cpuinfo_get_processors_count());
    hw.physical_cores = static_cast<int>(cpuinfo_get_cores_count());
    if (cpuinfo_get_l1d_caches_count()) hw.l1d_bytes = cpuinfo_get_l1d_cache(0)->size;
    if (cpuinfo_get_l2_caches_count()) hw.l2_bytes = cpuinfo_get_l2_cache(0)->size;
    if (cpuinfo_get_l3_caches_count()) hw.l3_bytes = cpuinfo_get_l3_cache(0)->size;
  }
  if (hw.cpu_model.empty()) {
    // cpuinfo leaves the package name empty on some virtual CPUs; /proc/cpuinfo still has it.
    std::ifstream f("/proc/cpuinfo");
    std::string line;
    while (std::getline(f, line))
      if (line.rfind("model name", 0) == 0) { hw.cpu_model = line.substr(line.find(':') + 2); break; }
  }
  if (hw.cpu_model.empty()) hw.cpu_model = "unknown CPU";
  // cpuinfo (2022) does not know AVX-VNNI (CPUID leaf 7, sub-leaf 1, EAX bit 4); ask the CPU, as
  // cpuinfo does for the rest (/proc/cpuinfo would describe the host even under an emulator).
  {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    hw.avxvnni = hw.avx2 && __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) && (eax & (1u << 4));
    // AMX-TILE and AMX-INT8: CPUID leaf 7, sub-leaf 0, EDX bits 24 and 25.
    hw.amx_int8 = __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) && (edx & (1u << 24)) && (edx & (1u << 25));
  }

  cpu_set_t set;
  CPU_ZERO(&set);
  int affinity = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : hw.logical_cpus;
  hw.granted_cpus = std::max(1, affinity);
  if (int quota = cgroup_cpu_limit(); quota > 0) hw.granted_cpus = std::min(hw.granted_cpus, quota);
  // Processes of one job on this machine share it: each takes at most its share of the CPUs, so
  // unbound ones (--bind-to none, --oversubscribe) or ones bound to a whole socket do not each
  // start a thread per CPU; one bound to a core keeps its one.
  hw.ranks_on_node = launched_local_size();
  if (hw.ranks_on_node > 1) hw.granted_cpus = std::min(hw.granted_cpus, std::max(1, hw.logical_cpus / hw.ranks_on_node));

  hw.memory_total_bytes = static_cast<size_t>(sysconf(_SC_PHYS_PAGES)) * static_cast<size_t>(sysconf(_SC_PAGESIZE));
  hw.memory_available_bytes = meminfo_kib("MemAvailable");
  if (size_t limit = cgroup_memory_limit(); limit > 0) {
    hw.memory_total_bytes = std::min(hw.memory_total_bytes, limit);
    hw.memory_available_bytes = std::min(hw.memory_available_bytes, limit);
  }
  hw.memory_available_bytes /= size_t(hw.ranks_on_node);
  return hw;
}

}  // namespace

const HardwareInfo& cpu_hardware() {
  static const HardwareInfo hw = probe_cpu();
  return hw;
}

size_t peak_rss_bytes() {
  // VmHWM belongs to this process's own address space. getrusage's ru_maxrss is not enough: Linux
  // carries it across fork and exec, so a run started from a large process (a Python session)
  // would report that process's peak.
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmHWM:", 0) == 0) return size_t(std::stoull(line.substr(6))) * 1024;  // kB
  struct rusage usage {};
  if (getrusage(RUSAGE_SELF, &usage) != 0) return 0;
  return size_t(usage.ru_maxrss) * 1024;
}

}  // namespace hybrit
