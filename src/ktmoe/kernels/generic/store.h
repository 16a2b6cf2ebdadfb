/* The stream_f32 slot: dst[0, n) = src[0, n) (src NULL: zeros), for large outputs a call writes once and
 * does not read back (the LoRA grads, tens of MB per layer). A cached store first reads every line it
 * writes (read for ownership); non-temporal stores do not: Zen 3, 2 threads, 75 MB in 128 KB pieces,
 * memset 4.5 ms, 256-bit streaming 1.8 ms. The x86 widths stream; anything else copies. A store fence at
 * the end orders the streamed lines before the engine's barrier (non-temporal stores are weakly ordered). */
#ifndef KTMOE_GENERIC_STORE_H
#define KTMOE_GENERIC_STORE_H

#include "../base.h"

#if defined(__AVX__)
#include <immintrin.h>
#define KT_STREAM_LANES 8 /* 256-bit on the AVX-512 levels too: the line is what costs, not the vector width */
typedef __m256 kt_stream_vec;
#define KT_STREAM_LOAD _mm256_loadu_ps
#define KT_STREAM_ZERO _mm256_setzero_ps
#define KT_STREAM_STORE _mm256_stream_ps
#elif defined(__SSE2__)
#include <emmintrin.h>
#define KT_STREAM_LANES 4
typedef __m128 kt_stream_vec;
#define KT_STREAM_LOAD _mm_loadu_ps
#define KT_STREAM_ZERO _mm_setzero_ps
#define KT_STREAM_STORE _mm_stream_ps
#endif

static void kt_stream_f32(float *dst, const float *src, size_t n) {
    size_t i = 0;
#ifdef KT_STREAM_LANES
    /* cached stores up to the vector alignment, whole aligned vectors streamed, a cached tail */
    size_t head = (size_t)(-((uintptr_t)dst / sizeof(float))) % KT_STREAM_LANES;
    if ((uintptr_t)dst % sizeof(float) == 0 && n >= head + KT_STREAM_LANES) {
        for (; i < head; i++) dst[i] = src ? src[i] : 0.f;
        if (src)
            for (; i + KT_STREAM_LANES <= n; i += KT_STREAM_LANES) KT_STREAM_STORE(dst + i, KT_STREAM_LOAD(src + i));
        else {
            kt_stream_vec z = KT_STREAM_ZERO();
            for (; i + KT_STREAM_LANES <= n; i += KT_STREAM_LANES) KT_STREAM_STORE(dst + i, z);
        }
        _mm_sfence();
    }
#endif
    if (src)
        memcpy(dst + i, src + i, sizeof(float) * (n - i));
    else
        memset(dst + i, 0, sizeof(float) * (n - i));
}

#endif
