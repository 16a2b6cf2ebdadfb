/* The CPU features each level needs: the registry's usability tests (core/cpu.c). */
#ifndef KTMOE_CORE_CPU_H
#define KTMOE_CORE_CPU_H

#include <stddef.h>

int kt_cpu_usable_avx2(char *why, size_t len);
int kt_cpu_usable_avx512(char *why, size_t len);
int kt_cpu_usable_avx512bf16(char *why, size_t len);
int kt_cpu_usable_amx(char *why, size_t len); /* detection + the Linux permission request */

#endif
