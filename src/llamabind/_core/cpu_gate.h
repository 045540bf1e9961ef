/* One CPU budget for every decode in the process.
 *
 * Each llama.cpp context runs its graphs on a pool of threads of its own. Two contexts
 * decoding at once on a machine with fewer cores than their threads together make
 * ggml's workers wait at barriers for a core that another pool holds, hundreds of times
 * per token: measured on 2 cores, two 2-thread generations at once ran ~45x slower
 * together than one alone. The gate hands out "units" (threads): a decode takes as many
 * as its pool runs, waits while fewer are free, and gives them back when it returns.
 * So two 1-thread contexts on 2 cores still run side by side, and two 2-thread ones
 * take turns, each at full speed.
 *
 * Waiters are served in the order they came (a ticket each), so a decode that needs
 * every unit is not starved by a stream of small ones. A capacity of 0 turns the gate
 * off. The lock is re-initialised in a forked child (another thread may have held it at
 * the fork; the child's contexts are new anyway). */
#ifndef LLAMABIND_CPU_GATE_H
#define LLAMABIND_CPU_GATE_H

#include <pthread.h>
#include <stdint.h>

typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int capacity;       /* units in all; 0: no gate */
    int available;      /* units free now */
    uint64_t next;      /* the next ticket to hand out */
    uint64_t serving;   /* the ticket whose turn it is */
    uint64_t waits;     /* decodes that had to wait (for tests and stats) */
} llamabind_gate_t;

static llamabind_gate_t llamabind_gate = {
    PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, 0};

static void llamabind_gate_after_fork(void) {
    pthread_mutex_init(&llamabind_gate.lock, NULL);
    pthread_cond_init(&llamabind_gate.cond, NULL);
    llamabind_gate.available = llamabind_gate.capacity;
    llamabind_gate.next = llamabind_gate.serving = 0;
}

static inline void llamabind_gate_init(int capacity) {
    static int registered = 0;
    if (!registered) {
        pthread_atfork(NULL, NULL, llamabind_gate_after_fork);
        registered = 1;
    }
    pthread_mutex_lock(&llamabind_gate.lock);
    llamabind_gate.available += capacity - llamabind_gate.capacity;
    llamabind_gate.capacity = capacity;
    pthread_cond_broadcast(&llamabind_gate.cond);
    pthread_mutex_unlock(&llamabind_gate.lock);
}

/* Take `want` units (at most the capacity); returns how many were taken, to be given
 * back with llamabind_gate_leave. */
static inline int llamabind_gate_enter(int want) {
    pthread_mutex_lock(&llamabind_gate.lock);
    if (llamabind_gate.capacity <= 0) {
        pthread_mutex_unlock(&llamabind_gate.lock);
        return 0;
    }
    if (want > llamabind_gate.capacity) want = llamabind_gate.capacity;
    if (want < 1) want = 1;
    uint64_t ticket = llamabind_gate.next++;
    int waited = 0;
    while (ticket != llamabind_gate.serving || llamabind_gate.available < want) {
        waited = 1;
        pthread_cond_wait(&llamabind_gate.cond, &llamabind_gate.lock);
    }
    llamabind_gate.available -= want;
    llamabind_gate.serving++;
    llamabind_gate.waits += waited;
    pthread_cond_broadcast(&llamabind_gate.cond);
    pthread_mutex_unlock(&llamabind_gate.lock);
    return want;
}

static inline void llamabind_gate_leave(int taken) {
    if (taken <= 0) return;
    pthread_mutex_lock(&llamabind_gate.lock);
    llamabind_gate.available += taken;
    pthread_cond_broadcast(&llamabind_gate.cond);
    pthread_mutex_unlock(&llamabind_gate.lock);
}

static inline int llamabind_gate_capacity(void) { return llamabind_gate.capacity; }
static inline int llamabind_gate_available(void) { return llamabind_gate.available; }
static inline uint64_t llamabind_gate_waits(void) { return llamabind_gate.waits; }

#endif
