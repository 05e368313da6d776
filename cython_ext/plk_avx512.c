/* AVX-512 (F, BW, VL, DQ, VNNI) variant: the shared SIMD body with vpdpbusd as the byte dot. */
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#define SUFFIX avx512
#define PLK_VNNI 1
#include "plk_simd.h"
#include "plk_kq.h"
#include "plk_tl.h"
#pragma GCC pop_options
