// A kernel-time profiler for any CUDA program, without nsys: the CUDA driver loads this library
// at cuInit when CUDA_INJECTION64_PATH names it, and it records every kernel, memcpy and memset
// through CUPTI's activity API. At exit it writes one line per kernel name to $KPROF_OUT (default
// stderr), sorted by total time: total ms, launches, mean us, name <<<grid x block>>>. The first lines sum them up:
// the GPU time of kernels against the wall span from the first to the last record, which says how
// long the GPU waited for the host. Records inside CUDA graphs are counted like the others.
// After the table, "# idle before" lines: the GPU's idle time (no kernel, copy or set running) in
// gaps shorter than 1 ms, summed by the record that ended each gap, the longest first: what the
// GPU waited for inside steps (gaps of 1 ms or more, loading and the host's own phases, are only
// counted).
// Build: see tools/gpu/kprof/build.sh. Use: tools/gpu/kprof/run.sh <command ...>.
#include <cupti.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

char* __cxa_demangle(const char* mangled, char* out, size_t* len, int* status);

#define BUF (8u << 20)
#define SLOTS (1u << 14)

typedef struct { char* name; uint64_t ns; uint64_t n; } Entry;
static Entry table[SLOTS];
static uint64_t first_start = UINT64_MAX, last_end = 0, kernel_ns = 0, copy_ns = 0, set_ns = 0, kernels = 0;
static uint64_t dropped = 0;

// every record's interval and name slot, for the idle gaps
typedef struct { uint64_t start, end; uint32_t slot; } Rec;
#define MAX_RECS (16u << 20)
static Rec* recs = NULL;
static uint64_t n_recs = 0;

static uint64_t hash(const char* s) { uint64_t h = 1469598103934665603ull; while (*s) h = (h ^ (uint8_t)*s++) * 1099511628211ull; return h; }

static uint32_t add(const char* name, uint64_t ns) {
    uint64_t i = hash(name) & (SLOTS - 1);
    for (uint32_t probe = 0; probe < SLOTS; probe++, i = (i + 1) & (SLOTS - 1)) {
        if (!table[i].name) { table[i].name = strdup(name); table[i].ns = ns; table[i].n = 1; return (uint32_t)i; }
        if (!strcmp(table[i].name, name)) { table[i].ns += ns; table[i].n++; return (uint32_t)i; }
    }
    return SLOTS;
}

static void keep(uint64_t start, uint64_t end, uint32_t slot) {
    // address space for 16M records (384 MiB); pages are only touched as records arrive
    if (!recs) recs = malloc(sizeof(Rec) * MAX_RECS);
    if (recs && n_recs < MAX_RECS) { recs[n_recs].start = start; recs[n_recs].end = end; recs[n_recs].slot = slot; n_recs++; }
}

static void span(uint64_t s, uint64_t e) { if (s < first_start) first_start = s; if (e > last_end) last_end = e; }

static void CUPTIAPI requested(uint8_t** buf, size_t* size, size_t* max_records) {
    *buf = (uint8_t*)aligned_alloc(8, BUF);
    *size = BUF;
    *max_records = 0;
}

static void CUPTIAPI completed(CUcontext ctx, uint32_t stream, uint8_t* buf, size_t size, size_t valid) {
    (void)ctx; (void)stream; (void)size;
    CUpti_Activity* r = NULL;
    while (cuptiActivityGetNextRecord(buf, valid, &r) == CUPTI_SUCCESS) {
        switch (r->kind) {
        case CUPTI_ACTIVITY_KIND_KERNEL:
        case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL: {
            CUpti_ActivityKernel9* k = (CUpti_ActivityKernel9*)r;
            uint64_t ns = k->end - k->start;
            int st = 0;
            char* d = __cxa_demangle(k->name, NULL, NULL, &st);
            const char* name = (st == 0 && d) ? d : k->name;
            // the launch shape is part of the key: one kernel on different shapes shows as several lines
            char shortened[240];
            snprintf(shortened, sizeof shortened, "%.180s <<<%d,%d,%d x %d>>>", name, k->gridX, k->gridY, k->gridZ,
                     k->blockX);
            keep(k->start, k->end, add(shortened, ns));
            free(d);
            kernel_ns += ns; kernels++;
            span(k->start, k->end);
            break;
        }
        case CUPTI_ACTIVITY_KIND_MEMCPY: {
            CUpti_ActivityMemcpy6* m = (CUpti_ActivityMemcpy6*)r;
            char name[64];
            snprintf(name, sizeof name, "[memcpy kind %u]", (unsigned)m->copyKind);
            keep(m->start, m->end, add(name, m->end - m->start));
            copy_ns += m->end - m->start;
            span(m->start, m->end);
            break;
        }
        case CUPTI_ACTIVITY_KIND_MEMSET: {
            CUpti_ActivityMemset4* m = (CUpti_ActivityMemset4*)r;
            keep(m->start, m->end, add("[memset]", m->end - m->start));
            set_ns += m->end - m->start;
            span(m->start, m->end);
            break;
        }
        default: break;
        }
    }
    size_t d = 0;
    if (cuptiActivityGetNumDroppedRecords(ctx, stream, &d) == CUPTI_SUCCESS) dropped += d;
    free(buf);
}

static int by_time(const void* a, const void* b) {
    const Entry *x = a, *y = b;
    return (x->ns < y->ns) - (x->ns > y->ns);
}

static int by_start(const void* a, const void* b) {
    const Rec *x = a, *y = b;
    return (x->start > y->start) - (x->start < y->start);
}

// idle[slot]: idle ns in short gaps that this record's start ended
static void idle_report(FILE* f) {
    if (!recs || n_recs < 2) return;
    qsort(recs, n_recs, sizeof *recs, by_start);
    uint64_t* idle = calloc(SLOTS + 1, sizeof *idle);
    uint64_t* gaps = calloc(SLOTS + 1, sizeof *gaps);
    uint64_t busy_end = recs[0].end, short_ns = 0, long_ns = 0, n_short = 0;
    for (uint64_t i = 1; i < n_recs; i++) {
        if (recs[i].start > busy_end) {
            uint64_t g = recs[i].start - busy_end;
            if (g < 1000000) { idle[recs[i].slot] += g; gaps[recs[i].slot]++; short_ns += g; n_short++; }
            else long_ns += g;
        }
        if (recs[i].end > busy_end) busy_end = recs[i].end;
    }
    fprintf(f, "# idle in gaps under 1 ms: %.1f ms over %llu gaps; in longer gaps: %.1f ms%s\n", short_ns / 1e6,
            (unsigned long long)n_short, long_ns / 1e6, n_recs == MAX_RECS ? " (records truncated)" : "");
    for (int k = 0; k < 25; k++) {
        uint32_t best = SLOTS;
        for (uint32_t i = 0; i < SLOTS; i++) if (idle[i] && (best == SLOTS || idle[i] > idle[best])) best = i;
        if (best == SLOTS) break;
        fprintf(f, "# idle before\t%.3f ms\t%llu gaps\t%s\n", idle[best] / 1e6, (unsigned long long)gaps[best], table[best].name);
        idle[best] = 0;
    }
    free(idle); free(gaps);
}

static void report(void) {
    cuptiActivityFlushAll(1);
    const char* path = getenv("KPROF_OUT");
    FILE* f = path ? fopen(path, "w") : stderr;
    if (!f) f = stderr;
    Entry* e = malloc(sizeof table);
    size_t n = 0;
    for (size_t i = 0; i < SLOTS; i++) if (table[i].name) e[n++] = table[i];
    qsort(e, n, sizeof *e, by_time);
    double wall = last_end > first_start ? (last_end - first_start) / 1e6 : 0;
    fprintf(f, "# kernels %llu, kernel time %.1f ms, memcpy %.1f ms, memset %.1f ms, span first..last record %.1f ms, dropped %llu\n",
            (unsigned long long)kernels, kernel_ns / 1e6, copy_ns / 1e6, set_ns / 1e6, wall, (unsigned long long)dropped);
    fprintf(f, "# total_ms\tcalls\tmean_us\tname\n");
    for (size_t i = 0; i < n; i++)
        fprintf(f, "%.3f\t%llu\t%.2f\t%s\n", e[i].ns / 1e6, (unsigned long long)e[i].n, e[i].ns / 1e3 / e[i].n, e[i].name);
    idle_report(f);
    if (f != stderr) fclose(f);
}

int InitializeInjection(void) {
    cuptiActivityRegisterCallbacks(requested, completed);
    cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
    cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY);
    cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET);
    atexit(report);
    return 1;
}
