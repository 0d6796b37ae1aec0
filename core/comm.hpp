// The processes of one job: MPI's world when hybrit was launched by mpirun or srun, otherwise this
// process alone (rank 0 of 1, every call a no-op). Only the main thread calls it.
//
// MPI is optional at build time (libopenmpi-dev; HYBRIT_HAVE_MPI); a hybrit built without it that
// is launched by mpirun with more than one process says so instead of running N copies of one job.
// MPI_Init runs on the first Comm::world() (never in a process that no launcher started, so the
// Python module and plain runs never touch MPI); MPI_Finalize at exit.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace hybrit {

class Comm {
 public:
  // The job's communicator, initialised on first use. Throws Error(unsupported) when launched with
  // several processes by a hybrit built without MPI.
  static Comm& world();
  // Whether world() has run (MPI is up when this process is part of a launched job).
  static bool started();
  // Whether this build has MPI, and which ("Open MPI v4.1.4" or "built without MPI").
  static bool built_with_mpi();
  static std::string library_version();
  // Whether the MPI library takes CUDA device pointers (Open MPI's MPIX_Query_cuda_support; false
  // without MPI, or when the library cannot say). Debian's Open MPI is built without CUDA.
  static bool cuda_aware();

  int rank() const { return rank_; }
  int size() const { return size_; }
  bool distributed() const { return size_ > 1; }
  bool root() const { return rank_ == 0; }
  // Processes of this job on this machine (the launcher's local size) and the machine's name.
  int local_size() const { return local_size_; }
  const std::string& host() const { return host_; }
  // "rank 1 of 3 on node7" (empty for a single process): the prefix of a rank's messages.
  std::string where() const;

  // In place, the same result on every rank. Sizes beyond INT_MAX are sent in pieces.
  void allreduce_sum(float* data, int64_t n);
  void allreduce_sum(double* data, int64_t n);
  void allreduce_sum(int64_t* data, int64_t n);
  void allreduce_max(int64_t* data, int64_t n);
  // True on every rank when `flag` is true on any.
  bool any(bool flag);
  // On every rank: the ranks whose `flag` is true, in order.
  std::vector<int> ranks_where(bool flag);
  void broadcast(void* data, int64_t bytes, int root);
  // `text` as rank `root` has it, on every rank.
  std::string broadcast(std::string text, int root);
  void barrier();
  // All-to-all: `to[q]` goes to rank q; returns what every rank sent this one, concatenated in
  // rank order (`from` gets where each rank's piece starts: size() + 1 offsets). One process:
  // `to[0]` comes back.
  std::vector<float> exchange(const std::vector<std::vector<float>>& to, std::vector<int64_t>& from);

  // The rows [begin, end) of `n` that rank `rank` of `size` takes when the ranks split a set in
  // consecutive pieces in rank order: [n r / N, n (r + 1) / N), sizes differing by at most one.
  // Training splits a batch this way, reduce its records.
  struct Share {
    int64_t begin, end;
    int64_t size() const { return end - begin; }
  };
  static Share share_of(int64_t n, int rank, int size) { return {n * rank / size, n * (rank + 1) / size}; }
  Share share(int64_t n) const { return share_of(n, rank_, size_); }

  // A sum in place that may still be in flight when it returns; progress() lets MPI move it on,
  // wait_all() finishes every one started. Data must not be touched until wait_all().
  void start_allreduce_sum(float* data, int64_t n);
  void progress();
  void wait_all();

  // Prints "hybrit: <where>: <message>" on stderr and ends every process of the job with `code`.
  [[noreturn]] void abort_job(const std::string& message, int code);

  Comm(const Comm&) = delete;
  Comm& operator=(const Comm&) = delete;

 private:
  Comm();
  int rank_ = 0, size_ = 1, local_size_ = 1;
  std::string host_;
};

// Where each rank's rows start in a set the ranks hold in consecutive pieces in rank order, each
// rank giving how many it holds: size() + 1 offsets, the last the total, the same on every rank.
// `comm` null: this process alone ({0, local_rows}).
std::vector<int64_t> row_offsets(Comm* comm, int64_t local_rows);

// Whether a launcher (mpirun, mpiexec, srun) started this process as part of a job, by the
// environment it sets, and how many processes the job has (1 when none did).
int launched_job_size();
// How many of the job's processes the launcher started on this machine (1 when none did).
int launched_local_size();
// This process's rank as the launcher set it (0 when none did); known before MPI starts, so the
// log can name it from the first line.
int launched_rank();

}  // namespace hybrit
