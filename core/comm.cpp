#include "core/comm.hpp"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "core/error.hpp"

#ifdef HYBRIT_HAVE_MPI
#include <mpi.h>
#if __has_include(<mpi-ext.h>)
#include <mpi-ext.h>  // Open MPI's extensions: MPIX_CUDA_AWARE_SUPPORT
#endif
#endif

namespace hybrit {

namespace {
int env_int(const char* name) {
  const char* v = std::getenv(name);
  if (!v || !*v) return -1;
  char* end = nullptr;
  const long n = std::strtol(v, &end, 10);  // the leading number
  return end != v && n >= 0 && n < INT_MAX ? int(n) : -1;
}

std::string hostname() {
  char name[256] = {};
  if (::gethostname(name, sizeof name - 1) != 0) return "this machine";
  return name;
}

#ifdef HYBRIT_HAVE_MPI
std::vector<MPI_Request> g_pending;  // the sums start_allreduce_sum has in flight
bool g_initialised_here = false;

// Every MPI call returns its code (MPI_ERRORS_RETURN): a failure is an Error naming the call.
void check(int code, const char* call) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING] = {};
  int length = 0;
  MPI_Error_string(code, text, &length);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  fail(ErrorKind::io, "rank ", rank, ": ", call, " failed (", std::string(text, size_t(length)), ")");
}

void finalize_at_exit() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized && g_initialised_here) MPI_Finalize();
}

// The largest piece one MPI call takes (its counts are int).
constexpr int64_t kMaxPiece = INT_MAX / 2;

#endif

enum class Reduction { sum, max };

// In place over the job's ranks, in pieces MPI's int counts take; nothing with one process. The
// MPI datatype follows T (float, double, int64_t).
template <class T>
void allreduce_in_place(int ranks, T* data, int64_t n, Reduction op) {
#ifdef HYBRIT_HAVE_MPI
  if (ranks == 1) return;
  const MPI_Datatype type = std::is_same_v<T, float> ? MPI_FLOAT : std::is_same_v<T, double> ? MPI_DOUBLE : MPI_INT64_T;
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, int64_t>, "a type MPI sums here");
  for (int64_t i = 0; i < n; i += kMaxPiece)
    check(MPI_Allreduce(MPI_IN_PLACE, data + i, int(std::min(kMaxPiece, n - i)), type, op == Reduction::sum ? MPI_SUM : MPI_MAX, MPI_COMM_WORLD),
          "MPI_Allreduce");
#else
  (void)ranks, (void)data, (void)n, (void)op;
#endif
}
}  // namespace

// Whether an MPI launcher started this process (it sets these even for one process).
bool launched_by_mpi() {
  return env_int("OMPI_COMM_WORLD_SIZE") >= 0 || env_int("PMI_SIZE") >= 0 || env_int("PMIX_RANK") >= 0 || launched_job_size() > 1;
}

int launched_job_size() {
  for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"})
    if (const int n = env_int(name); n >= 1) return n;
  if (env_int("PMIX_RANK") >= 0) return std::max(1, env_int("SLURM_NTASKS"));
  return 1;
}

int launched_local_size() {
  for (const char* name : {"OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_STEP_TASKS_PER_NODE"})
    if (const int n = env_int(name); n >= 1) return n;  // Slurm's "2(x3)" reads as 2
  return 1;
}

int launched_rank() {
  for (const char* name : {"OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"})
    if (const int n = env_int(name); n >= 0) return n;
  return 0;
}

bool Comm::built_with_mpi() {
#ifdef HYBRIT_HAVE_MPI
  return true;
#else
  return false;
#endif
}

std::string Comm::library_version() {
#ifdef HYBRIT_HAVE_MPI
  char text[MPI_MAX_LIBRARY_VERSION_STRING] = {};
  int length = 0;
  MPI_Get_library_version(text, &length);
  std::string v(text, size_t(length));
  if (const size_t comma = v.find(','); comma != std::string::npos) v.resize(comma);  // "Open MPI v4.1.4, package: ..." -> "Open MPI v4.1.4"
  while (!v.empty() && (v.back() == '\n' || v.back() == ' ')) v.pop_back();
  return v;
#else
  return "built without MPI";
#endif
}

Comm::Comm() : host_(hostname()) {
#ifdef HYBRIT_HAVE_MPI
  if (!launched_by_mpi()) return;
  int initialised = 0;
  MPI_Initialized(&initialised);
  if (!initialised) {
    int provided = 0;
    if (MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS)
      fail(ErrorKind::io, "MPI_Init_thread failed: this process was started by an MPI launcher that its MPI library cannot join");
    g_initialised_here = true;
    std::atexit(finalize_at_exit);
  }
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  check(MPI_Comm_rank(MPI_COMM_WORLD, &rank_), "MPI_Comm_rank");
  check(MPI_Comm_size(MPI_COMM_WORLD, &size_), "MPI_Comm_size");
  // The processes on this machine: a communicator of those sharing memory.
  MPI_Comm local;
  check(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &local), "MPI_Comm_split_type");
  check(MPI_Comm_size(local, &local_size_), "MPI_Comm_size");
  MPI_Comm_free(&local);
#else
  if (const int launched = launched_job_size(); launched > 1)
    fail(ErrorKind::unsupported, "this process is one of ", launched,
         " started by an MPI launcher, but this hybrit was built without MPI: install libopenmpi-dev and openmpi-bin, configure again "
         "(cmake --preset release), and rebuild; or run one process");
#endif
}

namespace {
std::atomic<bool> g_started{false};
}

Comm& Comm::world() {
  static Comm comm;
  g_started = true;
  return comm;
}

bool Comm::started() { return g_started; }

std::string Comm::where() const { return size_ > 1 ? cat("rank ", rank_, " of ", size_, " on ", host_) : std::string(); }

bool Comm::cuda_aware() {
#if defined(HYBRIT_HAVE_MPI) && defined(MPIX_CUDA_AWARE_SUPPORT) && MPIX_CUDA_AWARE_SUPPORT
  return MPIX_Query_cuda_support() == 1;
#else
  return false;
#endif
}

void Comm::allreduce_sum(float* data, int64_t n) { allreduce_in_place(size_, data, n, Reduction::sum); }
void Comm::allreduce_sum(double* data, int64_t n) { allreduce_in_place(size_, data, n, Reduction::sum); }
void Comm::allreduce_sum(int64_t* data, int64_t n) { allreduce_in_place(size_, data, n, Reduction::sum); }
void Comm::allreduce_max(int64_t* data, int64_t n) { allreduce_in_place(size_, data, n, Reduction::max); }

bool Comm::any(bool flag) {
  int64_t v = flag ? 1 : 0;
  allreduce_max(&v, 1);
  return v != 0;
}

std::vector<int> Comm::ranks_where(bool flag) {
  std::vector<int64_t> flags(size_t(size_), 0);
  flags[size_t(rank_)] = flag ? 1 : 0;
  allreduce_max(flags.data(), int64_t(flags.size()));
  std::vector<int> ranks;
  for (int r = 0; r < size_; ++r)
    if (flags[size_t(r)]) ranks.push_back(r);
  return ranks;
}

void Comm::broadcast(void* data, int64_t bytes, int root) {
  if (size_ == 1) return;
#ifdef HYBRIT_HAVE_MPI
  char* p = static_cast<char*>(data);
  for (int64_t i = 0; i < bytes; i += kMaxPiece)
    check(MPI_Bcast(p + i, int(std::min(kMaxPiece, bytes - i)), MPI_BYTE, root, MPI_COMM_WORLD), "MPI_Bcast");
#else
  (void)data, (void)bytes, (void)root;
#endif
}

std::string Comm::broadcast(std::string text, int root) {
  if (size_ == 1) return text;
  int64_t length = int64_t(text.size());
  broadcast(&length, sizeof length, root);
  text.resize(size_t(length));
  broadcast(text.data(), length, root);
  return text;
}

void Comm::barrier() {
  if (size_ == 1) return;
#ifdef HYBRIT_HAVE_MPI
  check(MPI_Barrier(MPI_COMM_WORLD), "MPI_Barrier");
#endif
}

std::vector<float> Comm::exchange(const std::vector<std::vector<float>>& to, std::vector<int64_t>& from) {
  if (int(to.size()) != size_) fail(ErrorKind::invalid_argument, "Comm::exchange: ", to.size(), " pieces for ", size_, " ranks");
  from.assign(size_t(size_) + 1, 0);
  if (size_ == 1) {
    from[1] = int64_t(to[0].size());
    return to[0];
  }
#ifdef HYBRIT_HAVE_MPI
  // Every rank learns every piece's length first (one int64 all-to-all), then the floats move in
  // one MPI_Alltoallv, whose int counts and displacements bound each rank's share.
  std::vector<int64_t> send_counts(static_cast<size_t>(size_)), recv_counts(static_cast<size_t>(size_));
  for (int q = 0; q < size_; ++q) send_counts[size_t(q)] = int64_t(to[size_t(q)].size());
  check(MPI_Alltoall(send_counts.data(), 1, MPI_INT64_T, recv_counts.data(), 1, MPI_INT64_T, MPI_COMM_WORLD), "MPI_Alltoall");
  const size_t ranks = static_cast<size_t>(size_);
  std::vector<int> sc(ranks), sd(ranks), rc(ranks), rd(ranks);
  int64_t sent = 0;
  for (int q = 0; q < size_; ++q) {
    from[size_t(q) + 1] = from[size_t(q)] + recv_counts[size_t(q)];
    sent += send_counts[size_t(q)];
  }
  if (sent > INT_MAX || from.back() > INT_MAX)
    fail(ErrorKind::unsupported, "Comm::exchange: ", std::max(sent, from.back()), " values to or from rank ", rank_, ", more than one MPI_Alltoallv moves (", INT_MAX,
         "): run more ranks");
  std::vector<float> send;
  send.reserve(size_t(sent));
  for (int q = 0; q < size_; ++q) {
    sc[size_t(q)] = int(send_counts[size_t(q)]), sd[size_t(q)] = int(send.size());
    send.insert(send.end(), to[size_t(q)].begin(), to[size_t(q)].end());
    rc[size_t(q)] = int(recv_counts[size_t(q)]), rd[size_t(q)] = int(from[size_t(q)]);
  }
  std::vector<float> received(size_t(from.back()));
  check(MPI_Alltoallv(send.data(), sc.data(), sd.data(), MPI_FLOAT, received.data(), rc.data(), rd.data(), MPI_FLOAT, MPI_COMM_WORLD), "MPI_Alltoallv");
  return received;
#else
  return {};
#endif
}

std::vector<int64_t> row_offsets(Comm* comm, int64_t local_rows) {
  const int size = comm ? comm->size() : 1, rank = comm ? comm->rank() : 0;
  std::vector<int64_t> counts(size_t(size), 0);
  counts[size_t(rank)] = local_rows;
  if (comm) comm->allreduce_sum(counts.data(), size);
  std::vector<int64_t> offsets(size_t(size) + 1, 0);
  for (int r = 0; r < size; ++r) offsets[size_t(r) + 1] = offsets[size_t(r)] + counts[size_t(r)];
  return offsets;
}

void Comm::start_allreduce_sum(float* data, int64_t n) {
  if (size_ == 1) return;
#ifdef HYBRIT_HAVE_MPI
  for (int64_t i = 0; i < n; i += kMaxPiece) {
    MPI_Request request;
    check(MPI_Iallreduce(MPI_IN_PLACE, data + i, int(std::min(kMaxPiece, n - i)), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD, &request), "MPI_Iallreduce");
    g_pending.push_back(request);
  }
#else
  (void)data, (void)n;
#endif
}

void Comm::progress() {
#ifdef HYBRIT_HAVE_MPI
  if (g_pending.empty()) return;
  int done = 0;
  check(MPI_Testall(int(g_pending.size()), g_pending.data(), &done, MPI_STATUSES_IGNORE), "MPI_Testall");
#endif
}

void Comm::wait_all() {
#ifdef HYBRIT_HAVE_MPI
  if (g_pending.empty()) return;
  std::vector<MPI_Request> requests;
  requests.swap(g_pending);
  check(MPI_Waitall(int(requests.size()), requests.data(), MPI_STATUSES_IGNORE), "MPI_Waitall");
#endif
}

void Comm::abort_job(const std::string& message, int code) {
  std::fprintf(stderr, "hybrit: %s: %s\n", where().c_str(), message.c_str());
  std::fflush(stderr);
#ifdef HYBRIT_HAVE_MPI
  if (size_ > 1) MPI_Abort(MPI_COMM_WORLD, code);
#endif
  std::_Exit(code);
}

}  // namespace hybrit
