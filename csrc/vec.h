// ATen's vector types for the extension, at the instruction set this build targets.
//
// setup.py compiles for the building machine's CPU (-march=native where the compiler has it);
// when that gives AVX2 and FMA, ATen's AVX2 Vectorized<float> (with SLEEF exp, erf, tanh) is
// used, else its portable one. Include this header instead of ATen/cpu/vec/vec.h.
#pragma once

#if defined(__AVX2__) && defined(__FMA__) && !defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
#define CPU_CAPABILITY_AVX2
#endif
#ifndef CPU_CAPABILITY
#ifdef CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY AVX2
#else
#define CPU_CAPABILITY DEFAULT
#endif
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
