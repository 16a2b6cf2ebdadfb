/* ISA detection (CPUID + XGETBV) and the choice of the active kernel table. */
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "ktmoe.h"
#include "ops.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define KT_X86 1
#endif

static const char *const isa_names[KT_ISA_COUNT] = {"portable", "avx2", "avx512", "avx512bf16"};

typedef struct {
    int avx2, fma, f16c, avx512f, avx512bw, avx512vl, avx512dq, avx512bf16, avx512vnni, amx_tile, amx_bf16,
        amx_int8, os_ymm, os_zmm, os_amx;
    char brand[64];
} cpu_flags;

static cpu_flags flags;
static int flags_ready;

#ifdef KT_X86
static unsigned long long xgetbv0(void) {
    unsigned eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return ((unsigned long long)edx << 32) | eax;
}
#endif

static void detect(void) {
    if (flags_ready) return;
    memset(&flags, 0, sizeof flags);
    strcpy(flags.brand, "unknown");
#ifdef KT_X86
    unsigned a, b, c, d;
    if (__get_cpuid(1, &a, &b, &c, &d)) {
        int osxsave = (c >> 27) & 1;
        flags.fma = (c >> 12) & 1;
        flags.f16c = (c >> 29) & 1;
        if (osxsave) {
            unsigned long long xcr0 = xgetbv0();
            flags.os_ymm = (xcr0 & 0x6) == 0x6;             /* XMM + YMM state */
            flags.os_zmm = (xcr0 & 0xe6) == 0xe6;           /* + opmask, ZMM_Hi256, Hi16_ZMM */
            flags.os_amx = (xcr0 & 0x60000) == 0x60000;     /* XTILECFG + XTILEDATA */
        }
    }
    if (__get_cpuid_max(0, 0) >= 7) {
        __cpuid_count(7, 0, a, b, c, d);
        flags.avx2 = (b >> 5) & 1;
        flags.avx512f = (b >> 16) & 1;
        flags.avx512dq = (b >> 17) & 1;
        flags.avx512bw = (b >> 30) & 1;
        flags.avx512vl = (b >> 31) & 1;
        flags.avx512vnni = (c >> 11) & 1;
        flags.amx_bf16 = (d >> 22) & 1;
        flags.amx_tile = (d >> 24) & 1;
        flags.amx_int8 = (d >> 25) & 1;
        __cpuid_count(7, 1, a, b, c, d);
        flags.avx512bf16 = (a >> 5) & 1;
    }
    unsigned brand[12];
    if (__get_cpuid_max(0x80000000, 0) >= 0x80000004) {
        for (unsigned i = 0; i < 3; i++)
            __get_cpuid(0x80000002 + i, &brand[4 * i], &brand[4 * i + 1], &brand[4 * i + 2], &brand[4 * i + 3]);
        memcpy(flags.brand, brand, 48);
        flags.brand[48] = 0;
        char *s = flags.brand; /* trim leading and trailing blanks */
        while (*s == ' ') s++;
        memmove(flags.brand, s, strlen(s) + 1);
        for (size_t n = strlen(flags.brand); n > 0 && flags.brand[n - 1] == ' '; n--) flags.brand[n - 1] = 0;
    }
#endif
    flags_ready = 1;
}

int kt_isa_detected(void) {
    detect();
    int avx2 = flags.avx2 && flags.fma && flags.os_ymm;
    int avx512 = avx2 && flags.avx512f && flags.avx512bw && flags.avx512vl && flags.avx512dq && flags.os_zmm;
    if (avx512 && flags.avx512bf16) return KT_ISA_AVX512BF16;
    if (avx512) return KT_ISA_AVX512;
    if (avx2) return KT_ISA_AVX2;
    return KT_ISA_PORTABLE;
}

static const kt_ops *ops_for(int level) {
    switch (level) {
    case KT_ISA_AVX512BF16: return &kt_ops_avx512bf16;
    case KT_ISA_AVX512: return &kt_ops_avx512;
    case KT_ISA_AVX2: return &kt_ops_avx2;
    default: return &kt_ops_portable;
    }
}

static int active_level = -1;
const kt_ops *kt_ops_active;

int kt_isa_set(int level) {
    int best = kt_isa_detected();
    if (level < 0 || level > best) level = best;
    active_level = level;
    kt_ops_active = ops_for(level);
    return level;
}

int kt_isa_active(void) {
    if (active_level < 0) kt_isa_set(-1);
    return active_level;
}

const char *kt_isa_name(int level) {
    return (level >= 0 && level < KT_ISA_COUNT) ? isa_names[level] : "unknown";
}

int kt_isa_from_name(const char *name) {
    for (int i = 0; i < KT_ISA_COUNT; i++)
        if (strcasecmp(name, isa_names[i]) == 0) return i;
    return -1;
}

const char *kt_cpu_brand(void) {
    detect();
    return flags.brand;
}

void kt_cpu_features(char *buf, size_t len) {
    detect();
    struct { const char *name; int on; } list[] = {
        {"avx2", flags.avx2}, {"fma", flags.fma}, {"f16c", flags.f16c}, {"avx512f", flags.avx512f},
        {"avx512bw", flags.avx512bw}, {"avx512vl", flags.avx512vl}, {"avx512dq", flags.avx512dq},
        {"avx512_bf16", flags.avx512bf16}, {"avx512_vnni", flags.avx512vnni}, {"amx_tile", flags.amx_tile},
        {"amx_bf16", flags.amx_bf16}, {"amx_int8", flags.amx_int8}, {"os_ymm", flags.os_ymm},
        {"os_zmm", flags.os_zmm}, {"os_amx", flags.os_amx},
    };
    size_t used = 0;
    buf[0] = 0;
    for (size_t i = 0; i < sizeof list / sizeof list[0]; i++) {
        if (!list[i].on) continue;
        int n = snprintf(buf + used, len - used, "%s%s", used ? " " : "", list[i].name);
        if (n < 0 || (size_t)n >= len - used) break;
        used += (size_t)n;
    }
}
