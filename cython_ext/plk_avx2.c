/* AVX2 + FMA + F16C variant (Haswell, Zen 1-3 and later). */
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define SUFFIX avx2
#define PLK_VNNI 0
#include "plk_simd.h"
#include "plk_kq.h"
#include "plk_tl.h"
#pragma GCC pop_options
