/*
dev/moe/dist.h: training across processes, for train_moe.c (dev/DISTRIBUTED.md). USE_MPI=1 builds
(make train_moe_mpi) run under mpirun; every other build is one process, makes no MPI call, and keeps
from this file only the one-process answers (dist.world 1).

R = world ranks: every rank trains on B/R sequences of each global batch (data parallel); the
experts can be sharded over groups of ep consecutive ranks (expert parallel, -ep: ep_rank p holds
experts [p*E/ep, (p+1)*E/ep) of every layer), everything else is replicated on every rank.

Defines, and where train_moe.c calls it:
  Dist dist                       this rank's place (rank, world, ep, ep_rank)
  ep_group, ep_alloc, ep_free     model_alloc_acts / model_free_acts: the expert buffers' rows, and
                                  the buffers of the token exchange when the experts are sharded
  ep_experts_forward/_backward    the MoE block, in place of experts_forward/_backward when
                                  model->ep: permute -> dispatch -> experts -> combine -> unpermute
  dist_sum_counts                 the MoE block of a collective step: expert counts over all ranks
  dist_init, dist_setup, dist_shard_model, dist_allreduce_grads, dist_grad_norm, dist_mean,
  dist_gather_model, dist_check_replicas, dist_wait_all, ep_report_traffic, dist_finalize
                                  main: the steps around a training step's collectives
The CUDA trainer compiles train_moe.c with this file in its one-process form: its processes talk
over NCCL (train_moe.cu).
*/
#if defined(USE_MPI) && !defined(__CUDACC__)
#define DIST_MPI
#include <mpi.h>
#endif

typedef struct {
    int rank, world;   // in MPI_COMM_WORLD; world 1: one process, no MPI call is made
    int ep, ep_rank;   // expert-parallel group size, and this rank's place in its group
#ifdef DIST_MPI
    MPI_Comm ep_comm;  // the ep ranks that send each other tokens (all-to-all)
    MPI_Comm edp_comm; // the world/ep ranks that hold the same experts (their gradients are all-reduced)
#endif
} Dist;
static Dist dist = {0, 1, 1, 0
#ifdef DIST_MPI
                    , MPI_COMM_NULL, MPI_COMM_NULL
#endif
};

// ----------------------------------------------------------------------------
// the collectives of a step across processes (dist.world > 1; the plain build never reaches the MPI calls)

// the expert counts over every rank's tokens: gc[E] = the sum over ranks of counts[E]
void dist_sum_counts(int* gc, const int* counts, int E) {
#ifdef DIST_MPI
    MPI_Allreduce(counts, gc, E, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
#else
    memcpy(gc, counts, E * sizeof(int));
#endif
}

// expert parallel, step 1: who sends whom how many rows. Peer p of the group owns experts
// [p*E_local, (p+1)*E_local); counts[E] are this rank's rows per expert. rc[p*E_local + j] = the rows peer p has
// for local expert j (an all-to-all of E_local counts per peer), recv_offs[E_local+1] = where local expert j's
// rows start once they are grouped by expert (what experts_forward reads)
void ep_plan(int* rc, int* recv_offs, const int* counts, int E_local) {
#ifdef DIST_MPI
    MPI_Alltoall(counts, E_local, MPI_INT, rc, E_local, MPI_INT, dist.ep_comm);
#else
    memcpy(rc, counts, E_local * sizeof(int));
#endif
    recv_offs[0] = 0;
    for (int j = 0; j < E_local; j++) {
        int n = 0;
        for (int p = 0; p < dist.ep; p++) n += rc[p * E_local + j];
        recv_offs[j + 1] = recv_offs[j] + n;
    }
}

// the received rows arrive grouped by peer (and within a peer by expert); the experts want them
// grouped by expert (and within an expert by peer). to_expert 1: in (by peer) -> out (by expert); 0: back
void ep_reorder(float* out, const float* in, const int* rc, int E_local, int W, int to_expert) {
    int P = dist.ep;
    size_t by_expert = 0;
    for (int j = 0; j < E_local; j++)
        for (int p = 0; p < P; p++) {
            size_t by_peer = 0; // rows before (p, j) in the peer-major order
            for (int q = 0; q < P; q++)
                for (int i = 0; i < E_local; i++)
                    if (q < p || (q == p && i < j)) by_peer += rc[q * E_local + i];
            size_t n = (size_t)rc[p * E_local + j] * W;
            if (to_expert) memcpy(out + by_expert * W, in + by_peer * W, n * sizeof(float));
            else memcpy(out + by_peer * W, in + by_expert * W, n * sizeof(float));
            by_expert += rc[p * E_local + j];
        }
}

double ep_sent[2]; // floats this rank gave the all-to-alls of ep_exchange: in all, and to other ranks

// expert parallel, steps 2 and 4: rows of width W between this rank and the owners of their experts.
// dir +1 (dispatch): src = this rank's rows in permute_plan order (counts[E] per expert) -> dst = the
// rows of the local experts, grouped by expert (recv_offs). dir -1 (combine): the reverse. tmp: scratch
// as large as dst. The backward pass uses the same two exchanges, for dye and dxe.
void ep_exchange(float* dst, const float* src, float* tmp, const int* counts, const int* rc, int E_local, int W, int dir) {
#ifdef DIST_MPI
    int P = dist.ep;
    int* cnt = (int*)mallocCheck(4 * (size_t)P * sizeof(int)); // floats to/from each peer and their offsets
    int *sc = cnt, *sd = cnt + P, *rcv = cnt + 2 * P, *rd = cnt + 3 * P;
    for (int p = 0; p < P; p++) {
        sc[p] = 0; rcv[p] = 0;
        for (int j = 0; j < E_local; j++) { sc[p] += counts[p * E_local + j] * W; rcv[p] += rc[p * E_local + j] * W; }
        sd[p] = p ? sd[p - 1] + sc[p - 1] : 0;
        rd[p] = p ? rd[p - 1] + rcv[p - 1] : 0;
    }
    const int* out = dir > 0 ? sc : rcv; // what this rank sends
    for (int p = 0; p < P; p++) { ep_sent[0] += out[p]; ep_sent[1] += p == dist.ep_rank ? 0 : out[p]; }
    if (dir > 0) {
        MPI_Alltoallv(src, sc, sd, MPI_FLOAT, tmp, rcv, rd, MPI_FLOAT, dist.ep_comm);
        ep_reorder(dst, tmp, rc, E_local, W, 1);
    } else {
        ep_reorder(tmp, src, rc, E_local, W, 0);
        MPI_Alltoallv(tmp, rcv, rd, MPI_FLOAT, dst, sc, sd, MPI_FLOAT, dist.ep_comm);
    }
    free(cnt);
#else
    (void)dst; (void)src; (void)tmp; (void)counts; (void)rc; (void)E_local; (void)W; (void)dir;
    fprintf(stderr, "Error: expert parallelism needs the MPI build (make train_moe_mpi)\n");
    exit(EXIT_FAILURE);
#endif
}

// the expert buffers' rows: one process (or experts not sharded) NK = N*K; sharded, the experts here
// may get every slot of the group's N*K each
static int ep_group(const Model* model) { return model->E_local < model->config.E ? dist.ep : 1; }

// the token exchange of a model whose experts are sharded, per layer l where it says so
typedef struct EpBuffers {
    int* recv_counts; // L x ep x E_local  the rows each peer sends each local expert
    int* recv_offs;   // L x (E_local+1)   where each local expert's rows start, grouped by expert
    float* xr;        // L x NK_exp x C     the rows received for the local experts (kept for the backward)
    float *ye_r, *dye_r, *dxe_r, *tmp; // NK_exp x C each: outputs, their gradients, input gradients, scratch
} EpBuffers;

EpBuffers* ep_alloc(const Model* model, size_t NK_exp) {
    size_t L = model->config.L, C = model->config.C, E_local = model->E_local;
    EpBuffers* b = (EpBuffers*)mallocCheck(sizeof(EpBuffers));
    b->recv_counts = (int*)mallocCheck(L * dist.ep * E_local * sizeof(int));
    b->recv_offs = (int*)mallocCheck(L * (E_local + 1) * sizeof(int));
    b->xr = (float*)mallocCheck(L * NK_exp * C * sizeof(float));
    b->ye_r = (float*)mallocCheck(NK_exp * C * sizeof(float));
    b->dye_r = (float*)mallocCheck(NK_exp * C * sizeof(float));
    b->dxe_r = (float*)mallocCheck(NK_exp * C * sizeof(float));
    b->tmp = (float*)mallocCheck(NK_exp * C * sizeof(float));
    return b;
}
void ep_free(EpBuffers* b) {
    if (!b) return;
    free(b->recv_counts); free(b->recv_offs); free(b->xr); free(b->ye_r); free(b->dye_r); free(b->dxe_r); free(b->tmp);
    free(b);
}

// the experts of layer l across the group: permute -> dispatch -> experts -> combine -> unpermute.
// xe: this rank's rows in permute order; ye: their outputs, back in the same order
void ep_experts_forward(Model* model, int l, float* ye, float* h1, float* h3, float* act, const float* xe,
                        const float* w1, const float* w3, const float* w2) {
    const MoEConfig* c = &model->config;
    int E_local = model->E_local, C = c->C, NK_exp = model->B * model->T * c->K * dist.ep;
    EpBuffers* b = model->ep;
    const int* counts = model->counts + (size_t)l * c->E;
    int* rc = b->recv_counts + (size_t)l * dist.ep * E_local;
    int* recv_offs = b->recv_offs + (size_t)l * (E_local + 1);
    float* xr = b->xr + (size_t)l * NK_exp * C;
    ep_plan(rc, recv_offs, counts, E_local);
    ep_exchange(xr, xe, b->tmp, counts, rc, E_local, C, +1);
    experts_forward(b->ye_r, h1, h3, act, xr, w1, w3, w2, recv_offs, E_local, C, c->F);
    ep_exchange(ye, b->ye_r, b->tmp, counts, rc, E_local, C, -1);
}

// its backward, the forward's exchanges mirrored: model->dye to the experts' owners, model->dxe back
void ep_experts_backward(Model* model, int l, const float* h1, const float* h3, const float* act) {
    const MoEConfig* c = &model->config;
    int E_local = model->E_local, C = c->C, F = c->F, NK_exp = model->B * model->T * c->K * dist.ep;
    EpBuffers* b = model->ep;
    ParamTensors p = model->params, g = model->grads;
    size_t eo1 = (size_t)l * E_local * F * C, eo2 = (size_t)l * E_local * C * F;
    const int* counts = model->counts + (size_t)l * c->E;
    const int* rc = b->recv_counts + (size_t)l * dist.ep * E_local;
    ep_exchange(b->dye_r, model->dye, b->tmp, counts, rc, E_local, C, +1);
    experts_backward(b->dxe_r, g.w1 + eo1, g.w3 + eo1, g.w2 + eo2, model->dact, model->dh1, model->dh3, b->dye_r,
                     b->xr + (size_t)l * NK_exp * C, h1, h3, act, p.w1 + eo1, p.w3 + eo1, p.w2 + eo2,
                     b->recv_offs + (size_t)l * (E_local + 1), E_local, C, F);
    ep_exchange(model->dxe, b->dxe_r, b->tmp, counts, rc, E_local, C, -1);
}

// ----------------------------------------------------------------------------
// training across processes: the steps around the model's collectives

// MPI_Init, this rank's place; ranks other than 0 print nothing but errors
void dist_init(int* argc, char*** argv) {
#ifdef DIST_MPI
    MPI_Init(argc, argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &dist.rank);
    MPI_Comm_size(MPI_COMM_WORLD, &dist.world);
    if (dist.rank != 0 && !freopen("/dev/null", "w", stdout)) exit(EXIT_FAILURE);
#else
    (void)argc; (void)argv;
#endif
}

void dist_finalize(void) {
#ifdef DIST_MPI
    MPI_Finalize();
#endif
}

// an error every rank finds alike (a flag, a shape): rank 0 says it, every rank exits non-zero
void dist_fail(const char* msg) {
    if (dist.rank == 0) fprintf(stderr, "Error: %s\n", msg);
    dist_finalize();
    exit(EXIT_FAILURE);
}

// the flags against the number of processes (ep: flag -ep, B: flag -b; one: the flag of a mode that
// runs in one process, NULL if none), and the expert-parallel groups: ranks [g*ep, (g+1)*ep) exchange
// tokens, ranks with the same rank % ep hold the same experts
void dist_setup(int ep, int B, const char* one, const MoEConfig* c) {
    if (dist.world == 1 && ep == 1) return;
#ifndef DIST_MPI
    (void)c; (void)B; (void)one;
    dist_fail("-ep needs the MPI build (make train_moe_mpi; run it under mpirun)");
#else
    char msg[256];
    if (one) snprintf(msg, sizeof msg, "%s runs in one process, not across %d (run ./train_moe)", one, dist.world);
    else if (dist.world % ep)
        snprintf(msg, sizeof msg, "-ep %d does not divide the %d processes (mpirun -np)", ep, dist.world);
    else if (c->E % ep)
        snprintf(msg, sizeof msg, "-ep %d does not divide E=%d experts (flag -ne or the checkpoint)", ep, c->E);
    else if (B % dist.world)
        snprintf(msg, sizeof msg, "-b %d (the global batch) is not divisible by the %d processes", B, dist.world);
    if (one || dist.world % ep || c->E % ep || B % dist.world) dist_fail(msg);
    dist.ep = ep;
    dist.ep_rank = dist.rank % dist.ep;
    MPI_Comm_split(MPI_COMM_WORLD, dist.rank / dist.ep, dist.rank, &dist.ep_comm);
    MPI_Comm_split(MPI_COMM_WORLD, dist.rank % dist.ep, dist.rank, &dist.edp_comm);
    printf("processes: %d ranks = %d data parallel x %d expert parallel; %d sequences per rank, %d experts per rank\n",
           dist.world, dist.world / dist.ep, dist.ep, B / dist.world, c->E / dist.ep);
#endif
}

// this rank's part of a whole model that every rank made alike (one init seed, or one checkpoint): the
// replicated tensors whole, experts [e_first, e_first + E_local) of each layer of the expert tensors;
// with AdamW m, v
void model_shard(Model* local, const Model* full, int e_first, int E_local) {
    const MoEConfig* c = &full->config;
    model_build_experts(local, c, e_first, E_local);
    const float* src[3] = {full->params_memory, full->m_memory, full->v_memory};
    float* dst[3] = {local->params_memory, local->m_memory, local->v_memory};
    size_t per = (size_t)c->F * c->C; // one expert of one layer, in w1, w3 or w2
    for (int b = 0; b < 3; b++) {
        const float* sp = src[b];
        float* dp = dst[b];
        for (int t = 0; t < NUM_PARAM_TENSORS; t++) {
            if (!is_expert_tensor(t)) memcpy(dp, sp, full->param_sizes[t] * sizeof(float));
            else for (int l = 0; l < c->L; l++)
                memcpy(dp + (size_t)l * E_local * per, sp + ((size_t)l * c->E + e_first) * per, E_local * per * sizeof(float));
            sp += full->param_sizes[t];
            dp += local->param_sizes[t];
        }
    }
}

void model_free(Model* model); // train_moe.c

// expert parallel (-ep > 1): each rank keeps its experts in *model; rank 0 keeps the whole model too, for
// evals and checkpoints. Returns the model that evaluates and is saved (the whole one on rank 0).
Model* dist_shard_model(Model* model) {
    static Model whole;
    if (dist.ep == 1) return model;
    Model local;
    int E_local = model->config.E / dist.ep;
    model_shard(&local, model, dist.ep_rank * E_local, E_local);
    Model* eval_model = model;
    if (dist.rank == 0) { whole = *model; eval_model = &whole; }
    else model_free(model);
    *model = local;
    return eval_model;
}

// the reverse, into rank 0's whole model (for evals and checkpoints): expert group 0 (ranks 0..ep-1)
// holds every expert, so its ranks send theirs; the other groups hold copies and take no part
void dist_gather_model(Model* full, const Model* local, int with_optimizer) {
#ifdef DIST_MPI
    if (dist.rank >= dist.ep) return;
    const MoEConfig* c = &local->config;
    int E_local = local->E_local, root = dist.rank == 0;
    size_t per = (size_t)c->F * c->C;
    const float* src[3] = {local->params_memory, local->m_memory, local->v_memory};
    float* dst[3] = {root ? full->params_memory : NULL, root ? full->m_memory : NULL, root ? full->v_memory : NULL};
    for (int b = 0; b < (with_optimizer ? 3 : 1); b++) {
        const float* sp = src[b];
        size_t doff = 0;
        for (int t = 0; t < NUM_PARAM_TENSORS; t++) {
            size_t whole = (size_t)c->L * c->E * per; // an expert tensor of the whole model
            if (!is_expert_tensor(t)) {
                if (root) memcpy(dst[b] + doff, sp, local->param_sizes[t] * sizeof(float));
                doff += local->param_sizes[t];
            } else {
                for (int l = 0; l < c->L; l++)
                    MPI_Gather(sp + (size_t)l * E_local * per, (int)(E_local * per), MPI_FLOAT,
                               root ? dst[b] + doff + (size_t)l * c->E * per : NULL, (int)(E_local * per), MPI_FLOAT, 0,
                               dist.ep_comm);
                doff += whole;
            }
            sp += local->param_sizes[t];
        }
    }
#else
    (void)full; (void)local; (void)with_optimizer;
#endif
}

// the sum over ranks of every gradient: the replicated tensors over all ranks, the expert tensors over
// the ranks holding the same experts. Fixed buckets in a fixed order, so the sums never depend on timing.
void dist_allreduce_grads(Model* model) {
#ifdef DIST_MPI
    const size_t bucket = (size_t)1 << 24;
    float* g = model->grads_memory;
    for (int t = 0; t < NUM_PARAM_TENSORS; t++) {
        size_t n = model->param_sizes[t];
        int expert = is_expert_tensor(t), ranks = expert ? dist.world / dist.ep : dist.world;
        for (size_t i = 0; i < n && ranks > 1; i += bucket)
            MPI_Allreduce(MPI_IN_PLACE, g + i, (int)(n - i < bucket ? n - i : bucket), MPI_FLOAT, MPI_SUM,
                          expert ? dist.edp_comm : MPI_COMM_WORLD);
        g += n;
    }
#else
    (void)model;
#endif
}

double sumsq_deterministic(const float* x, size_t n); // train_moe.c, optimizer

// the global gradient norm when the experts are sharded: the replicated tensors' sum of squares (the
// same on every rank) plus the sum over the expert group of each rank's experts'
float dist_grad_norm(const Model* model) {
    double s[2] = {0.0, 0.0};
    const float* g = model->grads_memory;
    for (int t = 0; t < NUM_PARAM_TENSORS; t++) {
        s[is_expert_tensor(t)] += sumsq_deterministic(g, model->param_sizes[t]);
        g += model->param_sizes[t];
    }
#ifdef DIST_MPI
    MPI_Allreduce(MPI_IN_PLACE, &s[1], 1, MPI_DOUBLE, MPI_SUM, dist.ep_comm);
#endif
    return (float)sqrt(s[0] + s[1]);
}

// x[n] = its mean over ranks (the logged loss terms)
void dist_mean(double* x, int n) {
#ifdef DIST_MPI
    MPI_Allreduce(MPI_IN_PLACE, x, n, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    for (int i = 0; i < n; i++) x[i] /= dist.world;
#else
    (void)x; (void)n;
#endif
}

// the router's aux and z of the last micro-batch: their means over ranks (for the val step's log)
void dist_mean_router_losses(Model* model) {
    double t[2];
    for (int l = 0; l < model->config.L; l++) {
        t[0] = model->aux[l]; t[1] = model->zl[l];
        dist_mean(t, 2);
        model->aux[l] = (float)t[0]; model->zl[l] = (float)t[1];
    }
}

// wait for every rank (while rank 0 evaluates alone) sleeping, not spinning on the cores it needs
void dist_wait_all(void) {
#ifdef DIST_MPI
    if (dist.world == 1) return;
    MPI_Request req;
    int done = 0;
    MPI_Ibarrier(MPI_COMM_WORLD, &req);
    for (;;) {
        MPI_Test(&req, &done, MPI_STATUS_IGNORE);
        if (done) break;
        struct timespec ms = {0, 1000000};
        nanosleep(&ms, NULL);
    }
#endif
}

// the replicas must hold the same bits: a hash of the replicated parameters over all ranks and of the
// experts over the ranks holding the same ones, compared before each checkpoint (an error if not)
void dist_check_replicas(const Model* model) {
#ifdef DIST_MPI
    uint64_t h[2] = {1469598103934665603ULL, 1469598103934665603ULL}; // FNV-1a: replicated, experts
    const unsigned char* p = (const unsigned char*)model->params_memory;
    for (int t = 0; t < NUM_PARAM_TENSORS; t++) {
        size_t n = model->param_sizes[t] * sizeof(float);
        uint64_t* hh = &h[is_expert_tensor(t)];
        for (size_t i = 0; i < n; i++) *hh = (*hh ^ p[i]) * 1099511628211ULL;
        p += n;
    }
    uint64_t lo[2], hi[2];
    MPI_Allreduce(&h[0], &lo[0], 1, MPI_UINT64_T, MPI_MIN, MPI_COMM_WORLD);
    MPI_Allreduce(&h[0], &hi[0], 1, MPI_UINT64_T, MPI_MAX, MPI_COMM_WORLD);
    MPI_Allreduce(&h[1], &lo[1], 1, MPI_UINT64_T, MPI_MIN, dist.edp_comm);
    MPI_Allreduce(&h[1], &hi[1], 1, MPI_UINT64_T, MPI_MAX, dist.edp_comm);
    int bad = lo[0] != hi[0] || lo[1] != hi[1], any;
    MPI_Allreduce(&bad, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    if (any) dist_fail("the ranks' copies of the parameters differ (a reduction that is not the same on every rank)");
#else
    (void)model;
#endif
}

// the all-to-all traffic of the training steps against its formula (main, at the end)
void ep_report_traffic(int steps, double tokens_per_step, const MoEConfig* c) {
    if (dist.ep == 1 || steps <= 0) return;
    dist_mean(ep_sent, 2);
    double per = dist.world * 4.0 / steps; // bytes per step, all ranks
    printf("all-to-all: %.0f bytes per step, all ranks, forward and backward (%.0f between ranks); "
           "formula 2*N*K*C*4 per layer forward: %.0f per step\n", ep_sent[0] * per, ep_sent[1] * per,
           2.0 * tokens_per_step * c->K * c->C * 4 * c->L);
}
