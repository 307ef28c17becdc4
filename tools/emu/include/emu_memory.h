// tools/emu/include/emu_memory.h: the emulated device memory beyond plain host memory (included
// by emu_runtime.h).
//
//  * The device arena (arena_init / dev_alloc) is a memfd mapped MAP_SHARED, so that the CTAs of
//    a concurrent launch, each a forked process, share it.
//  * A weak global-memory model for concurrent launches (NTKV_EMU_MEMORY=weak, the default;
//    "sc" turns it off). In a CTA's process the arena is remapped MAP_PRIVATE and read-only: a
//    CTA's plain stores land in its own copy of the page (taken at the first write fault, with a
//    twin of the page as it was), so no other CTA sees them. A __threadfence by any thread of
//    the CTA publishes the CTA's stores so far (the bytes that differ from the twins) to the
//    shared file and drops the copies; a CTA's stores that no fence published become visible
//    only when the whole launch has ended (the child logs them; the parent applies the logs
//    after the last CTA). So a flag or ticket that another CTA acts on within the launch is
//    only safe behind a fence, as on the GPU: drop the fence and the consumer reads stale data,
//    every run. Atomics and __ldcg work on the shared file at once (they are performed at L2).
//    Plain loads see the shared file, except on pages this CTA has written since its last
//    fence (a CTA-private, possibly stale view, like an L1 line). Not modelled: reordering of
//    a CTA's own atomics, a reader that needs an acquire fence.
//  * Reserved address space for production-scale index checks (reserve<T>): MAP_NORESERVE,
//    zero pages until touched, PROT_NONE guard bands on both sides, not poisoned for ASan (its
//    shadow of many GiB would be committed).
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define NTKV_EMU_RAW __attribute__((no_sanitize("address", "thread", "undefined"), noinline))
#else
#define NTKV_EMU_RAW __attribute__((noinline))
#endif

namespace ntkv_emu {

[[noreturn]] inline void die(const char* what);

constexpr size_t PAGE = 4096;

// ---- Reserved address space -----------------------------------------------------------------
// n zero T in address space reserved, not committed: only the pages a launch or the harness
// touches cost memory. A band of PROT_NONE pages on each side turns an access just outside the
// buffer (a wrapped or negative 32-bit offset) into a crash.
template <typename T>
class Reserved {
  public:
    static constexpr size_t GUARD = size_t(1) << 30;
    explicit Reserved(size_t n) : n_(n) {
        bytes_ = (n * sizeof(T) + PAGE - 1) / PAGE * PAGE;
        void* p = mmap(nullptr, bytes_ + 2 * GUARD, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) die("mmap of a reserved buffer failed");
        base_ = static_cast<unsigned char*>(p);
        if (mprotect(base_ + GUARD, bytes_, PROT_READ | PROT_WRITE) != 0) die("mprotect of a reserved buffer failed");
    }
    ~Reserved() { munmap(base_, bytes_ + 2 * GUARD); }
    Reserved(const Reserved&) = delete;
    Reserved& operator=(const Reserved&) = delete;
    T* get() const { return reinterpret_cast<T*>(base_ + GUARD); }
    T& operator[](size_t i) const { return get()[i]; }
    size_t size() const { return n_; }

  private:
    unsigned char* base_ = nullptr;
    size_t n_ = 0, bytes_ = 0;
};

// Resident memory of this process in MiB (to show what a reserved run costs).
inline long resident_mib() {
    FILE* f = std::fopen("/proc/self/statm", "r");
    long pages = 0, rss = 0;
    if (f != nullptr) {
        if (std::fscanf(f, "%ld %ld", &pages, &rss) != 2) rss = 0;
        std::fclose(f);
    }
    return rss * (long)sysconf(_SC_PAGESIZE) / (1 << 20);
}

// ---- The device arena -----------------------------------------------------------------------
inline unsigned char* arena = nullptr;  // MAP_SHARED view (private in a weak-model CTA process)
inline unsigned char* arena_alias = nullptr;  // always the shared file: atomics, __ldcg, publication
inline size_t arena_size = 0, arena_used = 0;
inline int arena_fd = -1;

inline bool in_arena(const void* p) {
    const unsigned char* c = static_cast<const unsigned char*>(p);
    return arena != nullptr && c >= arena && c < arena + arena_size;
}

// ---- Weak model state (set in a CTA's process only) -----------------------------------------
struct LogHeader {
    std::atomic<uint64_t> used;  // bytes of records after the header
    uint64_t cap;
};
// A record: offset (u64), length (u64), then length bytes, padded to 8.
inline LogHeader* weak_log = nullptr;
inline bool weak_active = false;
inline unsigned char* weak_dirty = nullptr;  // one byte per arena page
inline unsigned char* weak_twin = nullptr;   // the page as it was at its first write fault
inline std::vector<uint32_t>* weak_pages = nullptr;
inline std::atomic_flag weak_lock = ATOMIC_FLAG_INIT;
inline struct sigaction weak_old_segv;

inline bool weak_model_wanted() {
    const char* e = std::getenv("NTKV_EMU_MEMORY");
    if (e == nullptr || *e == '\0' || std::strcmp(e, "weak") == 0) return true;
    if (std::strcmp(e, "sc") == 0) return false;
    std::fprintf(stderr, "emu: NTKV_EMU_MEMORY=%s: expected weak or sc\n", e);
    std::exit(2);
}

NTKV_EMU_RAW inline void weak_acquire_lock() {
    while (weak_lock.test_and_set(std::memory_order_acquire)) sched_yield();
}
NTKV_EMU_RAW inline void weak_release_lock() { weak_lock.clear(std::memory_order_release); }

NTKV_EMU_RAW inline void raw_copy(unsigned char* d, const unsigned char* s, size_t n) {
    auto* dv = reinterpret_cast<volatile uint64_t*>(d);
    auto* sv = reinterpret_cast<const volatile uint64_t*>(s);
    for (size_t i = 0; i < n / 8; ++i) dv[i] = sv[i];
}

// First write to page pg since the last fence: make it a private, writable copy and keep a twin.
NTKV_EMU_RAW inline void weak_fault(size_t pg) {
    unsigned char* page = arena + pg * PAGE;
    // The twin comes from the shared file before the page turns writable: once it is, another
    // thread of this CTA may store to it without faulting, and that store must differ from it.
    raw_copy(weak_twin + pg * PAGE, arena_alias + pg * PAGE, PAGE);
    if (mprotect(page, PAGE, PROT_READ | PROT_WRITE) != 0) _exit(97);
    weak_dirty[pg] = 1;
    weak_pages->push_back((uint32_t)pg);
}

NTKV_EMU_RAW inline void weak_segv(int sig, siginfo_t* si, void* uc) {
    unsigned char* a = static_cast<unsigned char*>(si->si_addr);
    if (weak_active && a >= arena && a < arena + arena_size) {
        const size_t pg = (size_t)(a - arena) / PAGE;
        weak_acquire_lock();
        if (!weak_dirty[pg]) weak_fault(pg);
        weak_release_lock();
        return;  // the store is retried on the now writable private page
    }
    // Not ours: hand the fault to whoever had the handler before (ASan prints its report).
    sigaction(SIGSEGV, &weak_old_segv, nullptr);
    if ((weak_old_segv.sa_flags & SA_SIGINFO) && weak_old_segv.sa_sigaction != nullptr)
        weak_old_segv.sa_sigaction(sig, si, uc);
    else if (weak_old_segv.sa_handler != SIG_DFL && weak_old_segv.sa_handler != SIG_IGN)
        weak_old_segv.sa_handler(sig);
}

// Runs f(offset, pointer, length) for every run of bytes of the dirty pages that differ from
// the twins, then makes the pages read-only views of the shared file again.
template <typename F>
NTKV_EMU_RAW inline void weak_flush(F&& f) {
    for (uint32_t pg : *weak_pages) {
        unsigned char* page = arena + (size_t)pg * PAGE;
        // Read-only first: a concurrent store of this CTA now faults and waits for the lock.
        if (mprotect(page, PAGE, PROT_READ) != 0) _exit(97);
        const unsigned char* twin = weak_twin + (size_t)pg * PAGE;
        size_t i = 0;
        while (i < PAGE) {
            const volatile unsigned char* pv = page;
            if (pv[i] == twin[i]) {
                ++i;
                continue;
            }
            size_t j = i;
            while (j < PAGE && pv[j] != twin[j]) ++j;
            f((size_t)pg * PAGE + i, page + i, j - i);
            i = j;
        }
        // Drop the private copy: the next read sees the shared file.
        if (madvise(page, PAGE, MADV_DONTNEED) != 0) _exit(97);
        weak_dirty[pg] = 0;
    }
    weak_pages->clear();
}

NTKV_EMU_RAW inline void weak_store_shared(size_t off, const unsigned char* p, size_t n) {
    volatile unsigned char* d = arena_alias + off;
    for (size_t k = 0; k < n; ++k) d[k] = p[k];
}

// __threadfence: this CTA's stores so far become visible to every other CTA.
inline void weak_publish() {
    weak_acquire_lock();
    weak_flush([](size_t off, const unsigned char* p, size_t n) { weak_store_shared(off, p, n); });
    weak_release_lock();
}

// After an atomic on the shared file: a CTA sees its own atomics, also on a page it holds a
// private copy of.
NTKV_EMU_RAW inline void weak_after_atomic(const void* p, size_t n) {
    const size_t off = (size_t)(static_cast<const unsigned char*>(p) - arena);
    if (!weak_dirty[off / PAGE]) return;
    weak_acquire_lock();
    if (weak_dirty[off / PAGE]) {
        for (size_t k = 0; k < n; ++k) {
            arena[off + k] = arena_alias[off + k];
            weak_twin[off + k] = arena_alias[off + k];
        }
    }
    weak_release_lock();
}

// Where an atomic or an L2 load of p goes: the shared file.
template <typename T>
inline T* sync_ptr(T* p) {
    if (!weak_active || !in_arena(p)) return p;
    return reinterpret_cast<T*>(arena_alias + (reinterpret_cast<unsigned char*>(const_cast<std::remove_cv_t<T>*>(p)) - arena));
}
template <typename T>
inline void after_atomic(T* p) {
    if (weak_active && in_arena(p)) weak_after_atomic(p, sizeof(T));
}

// In a CTA's process, before its threads start.
inline void weak_begin() {
    if (arena == nullptr || weak_log == nullptr) return;
    if (mmap(arena, arena_size, PROT_READ, MAP_PRIVATE | MAP_FIXED, arena_fd, 0) == MAP_FAILED) die("weak model: remap failed");
    const size_t pages = arena_size / PAGE;
    weak_dirty = static_cast<unsigned char*>(mmap(nullptr, pages, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    weak_twin = static_cast<unsigned char*>(mmap(nullptr, arena_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    if (weak_dirty == MAP_FAILED || weak_twin == MAP_FAILED) die("weak model: mmap failed");
    weak_pages = new std::vector<uint32_t>();
    weak_pages->reserve(pages);
    struct sigaction sa {};
    sa.sa_sigaction = weak_segv;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGSEGV, &sa, &weak_old_segv) != 0) die("weak model: sigaction failed");
    weak_active = true;
}

// In a CTA's process, after its threads ended: the stores no fence published go to the log,
// for the parent to apply when the launch is over.
inline void weak_end() {
    if (!weak_active) return;
    weak_acquire_lock();
    weak_flush([](size_t off, const unsigned char* p, size_t n) {
        const uint64_t rec = 16 + (n + 7) / 8 * 8;
        const uint64_t at = weak_log->used.fetch_add(rec);
        if (at + rec > weak_log->cap) _exit(98);
        unsigned char* r = reinterpret_cast<unsigned char*>(weak_log + 1) + at;
        const uint64_t hdr[2] = {off, n};
        raw_copy(r, reinterpret_cast<const unsigned char*>(hdr), 16);
        for (size_t k = 0; k < n; ++k) r[16 + k] = p[k];
    });
    weak_release_lock();
    weak_active = false;
}

// In the parent, after every CTA of a launch ended.
NTKV_EMU_RAW inline void weak_apply_log() {
    if (weak_log == nullptr) return;
    const uint64_t used = weak_log->used.load();
    const unsigned char* r = reinterpret_cast<const unsigned char*>(weak_log + 1);
    for (uint64_t at = 0; at < used;) {
        uint64_t hdr[2];
        raw_copy(reinterpret_cast<unsigned char*>(hdr), r + at, 16);
        for (uint64_t k = 0; k < hdr[1]; ++k) arena_alias[hdr[0] + k] = r[at + 16 + k];
        at += 16 + (hdr[1] + 7) / 8 * 8;
    }
    weak_log->used.store(0);
}

}  // namespace ntkv_emu
