/* CPU detection (CPUID + XGETBV), the Linux AMX permission request, and the usability test of each level. */
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "ktmoe.h"
#include "cpu.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define KT_X86 1
#endif

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

/* ---- what each level needs (the registry's usability tests) ---- */

static int why_not(char *why, size_t len, const char *text) {
    if (why && len) snprintf(why, len, "%s", text);
    return 0;
}

int kt_cpu_usable_avx2(char *why, size_t len) {
    detect();
    if (!(flags.avx2 && flags.fma && flags.f16c)) return why_not(why, len, "the CPU lacks AVX2, FMA or F16C");
    if (!flags.os_ymm) return why_not(why, len, "the OS does not enable the YMM state");
    return 1;
}

int kt_cpu_usable_avx512(char *why, size_t len) {
    detect();
    if (!(flags.avx512f && flags.avx512bw && flags.avx512vl && flags.avx512dq))
        return why_not(why, len, "the CPU lacks AVX-512 F/BW/VL/DQ");
    if (!flags.os_zmm) return why_not(why, len, "the OS does not enable the ZMM state");
    return 1;
}

int kt_cpu_usable_avx512bf16(char *why, size_t len) {
    detect();
    if (!flags.avx512bf16) return why_not(why, len, "the CPU lacks AVX512_BF16");
    return 1;
}

#if defined(__linux__) && defined(KT_X86)
#include <sys/syscall.h>
#include <unistd.h>
#define KT_ARCH_GET_XCOMP_PERM 0x1022
#define KT_ARCH_REQ_XCOMP_PERM 0x1023
#define KT_XFEATURE_XTILEDATA 18
#endif

/* Linux hands out the tile data state only on request, once per process; asked once, before any tile
 * instruction. A refusal drops the level (with one line on stderr), never an illegal instruction. */
static int amx_permitted = -1;

static int request_amx_permission(void) {
    if (amx_permitted >= 0) return amx_permitted;
    amx_permitted = 0;
#if defined(__linux__) && defined(KT_X86) && defined(SYS_arch_prctl)
    unsigned long mask = 0;
    if (syscall(SYS_arch_prctl, KT_ARCH_REQ_XCOMP_PERM, KT_XFEATURE_XTILEDATA) == 0 &&
        syscall(SYS_arch_prctl, KT_ARCH_GET_XCOMP_PERM, &mask) == 0)
        amx_permitted = (mask >> KT_XFEATURE_XTILEDATA) & 1;
    if (!amx_permitted)
        fprintf(stderr, "ktmoe: the CPU has AMX but Linux refused the tile data permission; AMX is not used\n");
#endif
    return amx_permitted;
}

static int amx_detected(void) {
    detect();
    return flags.amx_tile && flags.amx_bf16 && flags.amx_int8 && flags.os_amx;
}

int kt_cpu_usable_amx(char *why, size_t len) {
    if (!amx_detected()) return why_not(why, len, "the CPU (or the OS's XCR0) has no AMX tiles");
    if (!request_amx_permission()) return why_not(why, len, "Linux refused the AMX tile data permission");
    return 1;
}

void kt_amx_status(int *detected, int *permitted) {
    *detected = amx_detected();
    *permitted = *detected ? request_amx_permission() : 0;
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
