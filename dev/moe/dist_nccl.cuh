/*
Processes for train_moe.cu: data parallel over MPI and NCCL (USE_MPI=1 builds, train_moe_cu_mpi), one
process per GPU under mpirun. The names are train_moe.c's (dist_*), for the same roles.

Defines:
  dist                       this process's rank and the number of ranks (world); {0, 1} without USE_MPI
  dist_init, dist_finalize   MPI_Init (ranks other than 0 print nothing but errors) and MPI_Finalize
  dist_device                the GPU of this rank: rank % (GPUs this node shows)
  dist_nccl_init             after the GPU is chosen: the NCCL communicator and its stream
  dist_fail                  an error every rank found alike: rank 0 says it, every rank exits non-zero
  dist_wait_all              a barrier, asleep rather than spinning (while rank 0 evaluates or saves)
  dist_sum_counts            each layer's expert counts (device ints) summed over the ranks, by NCCL
  dist_allreduce_grads       the gradients (device floats) summed over the ranks, by NCCL
  dist_mean                  host doubles: their mean over the ranks (the logged loss terms), by MPI
  dist_check_replicas        every rank must hold the same parameters (a checksum compared by MPI)
Without USE_MPI there is one rank and every function does nothing (dist_fail exits).

Hooks in train_moe.cu: #included after the CUDA utilities (it uses cudaCheck and cuda_free);
model_forward calls dist_sum_counts when model->collective; main calls dist_init first, dist_setup
(the flags against dist.world), gpu_init (which picks dist_device()), dist_nccl_init, and in each
step dist_allreduce_grads, dist_mean, dist_check_replicas before a checkpoint, dist_wait_all after
rank 0's evals, dist_finalize at the end. <mpi.h> and <nccl.h> are included at the top of train_moe.cu,
before train_moe.c (whose own #include <mpi.h> sits inside namespace cpu and must then add nothing).

R processes, one per GPU, started by mpirun; rank r trains on sequences [r*B/R, (r+1)*B/R) of every
global batch. The collectives: each layer's expert counts and the gradients, summed over the ranks by
NCCL; by MPI, the logged loss terms (their means over the ranks) and, before each checkpoint, a
checksum of every rank's parameters.
*/
#ifdef USE_MPI
#include <mpi.h>
#include <nccl.h>
#endif

typedef struct { int rank, world; } Dist; // this process's rank in MPI_COMM_WORLD, and the number of ranks R
static Dist dist = {0, 1};
#ifdef USE_MPI
static ncclComm_t nccl_comm;
static cudaStream_t nccl_stream; // NCCL's: a blocking stream, so it is ordered with the default (legacy) stream
                                 // of every kernel both ways, with no events
static void mpi_check(int err, const char* file, int line) {
    if (err == MPI_SUCCESS) return;
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(err, msg, &len);
    cpu::die("MPI: %s", msg, file, line);
}
#define mpiCheck(err) mpi_check(err, __FILE__, __LINE__)
static void nccl_check(ncclResult_t r, const char* file, int line) {
    if (r != ncclSuccess) cpu::die("NCCL: %s", ncclGetErrorString(r), file, line);
}
#define ncclCheck(r) nccl_check(r, __FILE__, __LINE__)
#endif

// MPI_Init, this process's rank and the world size. Only rank 0 prints: the others' stdout goes to
// /dev/null (their errors still reach stderr).
void dist_init(int* argc, char*** argv) {
#ifdef USE_MPI
    mpiCheck(MPI_Init(argc, argv));
    mpiCheck(MPI_Comm_rank(MPI_COMM_WORLD, &dist.rank));
    mpiCheck(MPI_Comm_size(MPI_COMM_WORLD, &dist.world));
    if (dist.rank > 0 && !freopen("/dev/null", "w", stdout)) cpu::die("stdout to /dev/null: %s", strerror(errno), __FILE__, __LINE__);
#else
    (void)argc; (void)argv;
#endif
}

// the GPU of this rank: rank % (GPUs this node shows)
int dist_device(void) {
    int dev = 0;
#ifdef USE_MPI
    int ndev = 0;
    cudaCheck(cudaGetDeviceCount(&ndev));
    if (ndev > 0) dev = dist.rank % ndev;
#endif
    return dev;
}

// after gpu_init chose this rank's GPU: rank 0 makes the NCCL id, MPI hands it to every rank, all join
void dist_nccl_init(void) {
#ifdef USE_MPI
    ncclUniqueId id;
    if (dist.rank == 0) ncclCheck(ncclGetUniqueId(&id));
    mpiCheck(MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, MPI_COMM_WORLD));
    ncclCheck(ncclCommInitRank(&nccl_comm, dist.world, id, dist.rank));
    cudaCheck(cudaStreamCreate(&nccl_stream));
#endif
}

void dist_finalize(void) {
#ifdef USE_MPI
    if (nccl_comm) {
        ncclCheck(ncclCommDestroy(nccl_comm));
        cudaCheck(cudaStreamDestroy(nccl_stream));
    }
    nccl_comm = NULL;
    mpiCheck(MPI_Finalize());
#endif
}

// stop after an error that every rank found alike: rank 0 says what ("Error: msg"), every rank exits
// non-zero and none is left waiting for another
void dist_fail(const char* msg) {
    if (dist.rank == 0) fprintf(stderr, "Error: %s\n", msg);
    dist_finalize();
    exit(EXIT_FAILURE);
}

// every rank waits here for the others (while rank 0 evaluates or saves), asleep rather than spinning on
// a core rank 0's host code may need
void dist_wait_all(void) {
#ifdef USE_MPI
    MPI_Request req;
    int done = 0;
    mpiCheck(MPI_Ibarrier(MPI_COMM_WORLD, &req));
    for (;;) {
        mpiCheck(MPI_Test(&req, &done, MPI_STATUS_IGNORE));
        if (done) break;
        struct timespec ms = {0, 1000000};
        nanosleep(&ms, NULL);
    }
#endif
}

// counts[n] (device: one layer's expert counts) := their sum over the ranks, in place; and the same for
// grads[n] (device: the gradients). NCCL adds in a fixed order for a given R and machine, and every rank
// receives the same bits.
#ifdef USE_MPI
static void nccl_sum_in_place(void* x, size_t n, ncclDataType_t type) {
    ncclCheck(ncclAllReduce(x, x, n, type, ncclSum, nccl_comm, nccl_stream));
}
void dist_sum_counts(int* counts, size_t n) { nccl_sum_in_place(counts, n, ncclInt32); }
void dist_allreduce_grads(float* grads, size_t n) { nccl_sum_in_place(grads, n, ncclFloat32); }
#else
void dist_sum_counts(int*, size_t) {}
void dist_allreduce_grads(float*, size_t) {}
#endif

// x[n] (host) := its mean over the ranks
void dist_mean(double* x, int n) {
#ifdef USE_MPI
    mpiCheck(MPI_Allreduce(MPI_IN_PLACE, x, n, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD));
    for (int i = 0; i < n; i++) x[i] /= dist.world;
#else
    (void)x; (void)n;
#endif
}

#ifdef USE_MPI
// *out += sum_i bits(x[i]) * (2i+1) mod 2^64: integer adds, the same in any order
__global__ void checksum_kernel(unsigned long long* out, const float* x, size_t n) {
    unsigned long long s = 0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        s += (unsigned long long)__float_as_uint(x[i]) * (2 * i + 1);
    atomicAdd(out, s);
}
#endif
// every rank must hold the same bits in params[n] (device: the replicated parameters): a checksum of
// them compared over the ranks; where they differ, an error on rank 0 and every rank stops
void dist_check_replicas(const float* params, size_t n) {
#ifdef USE_MPI
    unsigned long long *sum_d, h, lo, hi;
    cudaCheck(cudaMalloc(&sum_d, sizeof(*sum_d)));
    cudaCheck(cudaMemset(sum_d, 0, sizeof(*sum_d)));
    checksum_kernel<<<1024, 256>>>(sum_d, params, n);
    cudaCheck(cudaGetLastError());
    cudaCheck(cudaMemcpy(&h, sum_d, sizeof(h), cudaMemcpyDeviceToHost));
    cuda_free(sum_d);
    mpiCheck(MPI_Allreduce(&h, &lo, 1, MPI_UNSIGNED_LONG_LONG, MPI_MIN, MPI_COMM_WORLD));
    mpiCheck(MPI_Allreduce(&h, &hi, 1, MPI_UNSIGNED_LONG_LONG, MPI_MAX, MPI_COMM_WORLD));
    if (lo != hi) dist_fail("the ranks' copies of the parameters differ (a sum that was not the same on every rank)");
#else
    (void)params; (void)n;
#endif
}
