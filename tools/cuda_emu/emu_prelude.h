// The precompiled prelude of an emulated kernel translation unit: ATen, torch/library.h and the
// emulation headers, compiled before __CUDA_ARCH__ is defined (ATen's own headers keep their host
// code paths; the kernel sources then see __CUDA_ARCH__ and take their device paths).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <type_traits>

#include "emu_host.h"
