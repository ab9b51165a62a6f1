// Unit tests of the plugin's TensorRT- and CUDA-free logic (moe_plugin_logic.h) over generated
// kernel sets. No test framework: CHECK macros and a registry of named cases.
//
//   ce_moe_logic_tests [--no-fixtures] [CASE ...]
//
// The fixtures (tests/fixtures/*.inc, from tests/make_fixtures.py) are compiled in; --no-fixtures
// leaves their libraries empty, so the fixture cases fail (the harness's own test). aot_contract
// checks the kernel sets linked in through embedded_kernels.cpp (CMake: CE_TRT_TEST_AOT_DIR).
// Prints "[ OK ] name" / "[FAIL] name" per case and "N passed, M failed"; exit 1 on failure.

#include "embedded_kernels.h"
#include "moe_plugin_logic.h"
#include "request_checks.h"

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iostream>
#include <random>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

// ------------------------------------------------------------------------------------------------
// Allocation counting (alloc_counter.cpp): buildLaunchPlan must not allocate (it runs in
// onShapeChange and may run in enqueue).
long allocationCount();

// ------------------------------------------------------------------------------------------------
// A tiny test harness

namespace
{

struct TestCase
{
    char const* name;
    std::function<void()> body;
};

std::vector<TestCase>& registry()
{
    static std::vector<TestCase> cases;
    return cases;
}

struct Registrar
{
    Registrar(char const* name, std::function<void()> body)
    {
        registry().push_back({name, std::move(body)});
    }
};

int gFailures = 0;

#define TEST_CASE(name)                                                                                                \
    static void test_##name();                                                                                         \
    static Registrar registrar_##name(#name, test_##name);                                                             \
    static void test_##name()

#define CHECK(cond)                                                                                                    \
    do                                                                                                                 \
    {                                                                                                                  \
        if (!(cond))                                                                                                   \
        {                                                                                                              \
            ++gFailures;                                                                                               \
            std::cerr << __FILE__ << ":" << __LINE__ << ": CHECK(" #cond ") failed\n";                                 \
        }                                                                                                              \
    } while (0)

#define CHECK_EQ(a, b)                                                                                                 \
    do                                                                                                                 \
    {                                                                                                                  \
        auto const va_ = (a);                                                                                          \
        auto const vb_ = (b);                                                                                          \
        if (!(va_ == vb_))                                                                                             \
        {                                                                                                              \
            ++gFailures;                                                                                               \
            std::cerr << __FILE__ << ":" << __LINE__ << ": CHECK_EQ(" #a ", " #b ") failed: " << va_ << " != " << vb_ \
                      << "\n";                                                                                         \
        }                                                                                                              \
    } while (0)

#define CHECK_CONTAINS(text, part)                                                                                     \
    do                                                                                                                 \
    {                                                                                                                  \
        std::string const t_ = (text);                                                                                 \
        if (t_.find(part) == std::string::npos)                                                                        \
        {                                                                                                              \
            ++gFailures;                                                                                               \
            std::cerr << __FILE__ << ":" << __LINE__ << ": '" << t_ << "' does not contain '" << (part) << "'\n";      \
        }                                                                                                              \
    } while (0)

using namespace ce_trt;

int64_t cdiv(int64_t a, int64_t b)
{
    return (a + b - 1) / b;
}

int64_t maxPadded(int64_t pairs, int64_t experts, int64_t blockM)
{
    return pairs + std::min(experts, pairs) * (blockM - 1);
}

int64_t maxBlocks(int64_t pairs, int64_t experts, int64_t blockM)
{
    return cdiv(maxPadded(pairs, experts, blockM), blockM);
}

} // namespace

// The fixtures: kernel_set.inc files as ce_kernels.aot writes them, with stand-in cubins
// (tests/make_fixtures.py), each in a namespace of its own like embed_kernels.py does.
namespace ce_trt::fixtures::ce
{
#include "fixtures/ce_k4_nce2_e8.inc"
}
namespace ce_trt::fixtures::scaled
{
#include "fixtures/plain_k2_scale2p5_e8.inc"
}
namespace ce_trt::fixtures::sparsemixer
{
#include "fixtures/sparsemixer_e8_e16.inc"
}
namespace ce_trt::fixtures::sigmoid
{
#include "fixtures/sigmoid_k4_nce2_g4_e16.inc"
}
namespace ce_trt::fixtures::clamped
{
#include "fixtures/clamped_k4_nce2_e8.inc"
}

// A hand-written kernel set over the same types: two routing kernels (bf16 logits and its fp32
// twin), a kernel with an offset pointer, a u32 argument, a grid that can be empty and one
// trailing scratch pointer.
namespace ce_trt::fixtures::synthetic
{

Int padded(Dims const& d, int64_t blockM)
{
    return d.T * d.KM + smaller(d.E, d.T * d.KM) * (blockM - 1);
}

struct route
{
    static Grid grid(Dims const& d)
    {
        return Grid{cdiv(d.T, 16), 1, 1};
    }
    static int32_t args(Dims const& d, ArgValue* a)
    {
        a[0] = pointer("logits_ptr", kBufRouterLogits, 0, true);
        a[1] = pointer("w_ptr", kNumIoBuffers + 0, 0, true);
        a[2] = i32("n", d.T, false);
        return 3;
    }
};

template <int64_t kBlockM>
struct work
{
    static Grid grid(Dims const& d)
    {
        return Grid{cdiv(padded(d, kBlockM), kBlockM), d.C, 1};
    }
    static int32_t args(Dims const& d, ArgValue* a)
    {
        a[0] = pointer("aux_ptr", kNumIoBuffers + 1, d.KM * 4, false);
        a[1] = pointer("x_ptr", kBufHidden, 0, true);
        a[2] = u32("count", padded(d, kBlockM), false);
        a[3] = i32("width", d.H * 1024 * 1024, true);
        return 4;
    }
};

unsigned char const kStandIn[] = {1, 2, 3};
KernelImage const kRouteImages[] = {{80, "route", 0, kStandIn, sizeof(kStandIn)}};
KernelImage const kWork16Images[] = {{80, "work", 70000, kStandIn, sizeof(kStandIn)}};
KernelImage const kWork4Images[] = {{80, "work", 1000, kStandIn, sizeof(kStandIn)}};

KernelDesc const kKernels[] = {
    {"route_bf16", 4, DType::kBF16, 1, 2, &route::grid, &route::args, kRouteImages, 1},
    {"route_fp32", 4, DType::kFP32, -1, 2, &route::grid, &route::args, kRouteImages, 1},
    {"work_bm16", 2, DType::kOther, -1, 1, &work<16>::grid, &work<16>::args, kWork16Images, 1},
    {"work_bm4", 2, DType::kOther, -1, 1, &work<4>::grid, &work<4>::args, kWork4Images, 1},
};
PlanDesc const kPlans[] = {
    {DType::kBF16, 4, 8, 2, {0, 3}},
    {DType::kBF16, 4, 1000000, 2, {0, 2}},
};
WorkspaceDesc const kWorkspace[] = {{"weights", 4}, {"ids", 4}, {"scratch", 0}};

void workspaceElements(Dims const& d, Int* elements)
{
    elements[0] = d.T * d.K;
    elements[1] = d.T * d.K;
    elements[2] = larger(padded(d, 4), padded(d, 16)) * d.H;
}

MoeAttrs layer()
{
    MoeAttrs a;
    a.topK = 2;
    a.nCe = 1;
    a.normTopkProb = 1;
    return a;
}

int32_t const kArchs[] = {80};
KernelSetDesc const kKernelSet
    = {"synthetic", &layer, kArchs, 1, kKernels, 4, kPlans, 2, kWorkspace, 3, &workspaceElements};

} // namespace ce_trt::fixtures::synthetic

namespace
{

bool gNoFixtures = false; // --no-fixtures: the fixture libraries come up empty (the harness's own test)

KernelLibrary const& fixtureLibrary(KernelSetDesc const& set)
{
    KernelLibrary* lib = new KernelLibrary(gNoFixtures ? std::vector<KernelSetDesc const*>{}
                                                       : std::vector<KernelSetDesc const*>{&set});
    return *lib; // leaked on purpose: lives for the whole run
}

KernelLibrary const& ceLibrary()
{
    static KernelLibrary const& library = fixtureLibrary(fixtures::ce::kKernelSet);
    return library;
}

KernelLibrary const& sparseMixerLibrary()
{
    static KernelLibrary const& library = fixtureLibrary(fixtures::sparsemixer::kKernelSet);
    return library;
}

KernelLibrary const& scaledLibrary()
{
    static KernelLibrary const& library = fixtureLibrary(fixtures::scaled::kKernelSet);
    return library;
}

KernelLibrary const& sigmoidLibrary()
{
    static KernelLibrary const& library = fixtureLibrary(fixtures::sigmoid::kKernelSet);
    return library;
}

//! The sigmoid fixture's layer: DeepSeek-V3-like routing (groups, renormalised, scaled) with CE.
MoeAttrs sigmoidAttrs()
{
    MoeAttrs a;
    a.routing = Routing::kSigmoidTopK;
    a.topK = 4;
    a.nCe = 2;
    a.normTopkProb = 1;
    a.routingScale = 2.5f;
    a.nGroup = 4;
    a.topkGroup = 2;
    return a;
}

KernelLibrary const& clampedLibrary()
{
    static KernelLibrary const& library = fixtureLibrary(fixtures::clamped::kKernelSet);
    return library;
}

//! The clamped fixture's layer: gpt-oss's experts (biases, clamped SwiGLU with alpha 1.702, limit 7)
//! and routing (renormalised softmax top-k), with CE.
MoeAttrs clampedAttrs()
{
    MoeAttrs a;
    a.topK = 4;
    a.nCe = 2;
    a.normTopkProb = 1;
    a.activation = Activation::kClampedSwiGLU;
    a.swigluAlpha = 1.702f;
    a.swigluLimit = 7.0f;
    return a;
}

KernelLibrary const& syntheticLibrary()
{
    static KernelLibrary const& library = fixtureLibrary(fixtures::synthetic::kKernelSet);
    return library;
}

PlanRequest planRequest(
    Variant variant, MoeAttrs const& attrs, DType act, DType logits, LayerDims const& dims, int32_t arch)
{
    PlanRequest r;
    r.variant = variant;
    r.attrs = attrs;
    r.activation = act;
    r.logits = logits;
    r.dims = dims;
    r.arch = arch;
    return r;
}

PlanRequest ceRequest(int64_t tokens, int32_t arch = 90, DType act = DType::kBF16)
{
    MoeAttrs attrs;
    attrs.topK = 4;
    attrs.nCe = 2;
    attrs.normTopkProb = 0;
    return planRequest(Variant::kCompressed, attrs, act, act, LayerDims{tokens, 128, 64, 8, 128}, arch);
}

std::string stemOf(KernelLibrary const& lib, LaunchPlan const& plan, int32_t i)
{
    return lib.set(plan.set).kernels[plan.launches[i].kernel].stem;
}

//! Where launch i's kernel takes the argument `name` (its generated args list), or -1: the tests
//! name arguments instead of counting them, so a kernel gaining one does not shift what they check.
int32_t argIndex(KernelLibrary const& lib, LaunchPlan const& plan, int32_t i, std::string_view name)
{
    KernelDesc const& kernel = lib.set(plan.set).kernels[plan.launches[i].kernel];
    std::array<ArgValue, kMaxKernelArgs> values{};
    int32_t const count = kernel.args(Dims{}, values.data()); // the names do not depend on the shapes
    for (int32_t a = 0; a < count; ++a)
    {
        if (name == values[a].name)
        {
            return a;
        }
    }
    return -1;
}

// ------------------------------------------------------------------------------------------------

TEST_CASE(shape_arithmetic)
{
    // The generated expressions' integer type: exact, and any overflow or division by zero sticks.
    Int const t = 37;
    CHECK_EQ((t * 4 + 1).v, int64_t{149});
    CHECK_EQ(cdiv(t, 16).v, int64_t{3});
    CHECK_EQ(smaller(t, 8).v, int64_t{8});
    CHECK_EQ(larger(t, 8).v, int64_t{37});
    CHECK((t * 4).ok);
    Int const huge = Int{int64_t{1} << 62} * 4;
    CHECK(!huge.ok);
    CHECK(!(huge - 1 + 1).ok);
    CHECK(!smaller(huge, 1).ok);
    CHECK(!(t / 0).ok);
    CHECK(!cdiv(t, 0).ok);
    CHECK(!(Int{INT64_MIN} - 1).ok);
}

TEST_CASE(fields_roundtrip)
{
    for (Variant v : kAllVariants)
    {
        MoeAttrs attrs;
        attrs.routing = routingOf(v);
        bool const topK = attrs.routing != Routing::kSparseMixer;
        attrs.topK = topK ? 8 : 2;
        attrs.nCe = isCompressed(v) ? (topK ? 4 : 1) : 0;
        attrs.normTopkProb = topK ? 1 : 0;
        attrs.routingScale = topK ? 2.5f : 1.0f;
        attrs.jitterEps = topK ? 0.0f : 0.01f;
        if (attrs.routing == Routing::kSigmoidTopK)
        {
            attrs.nGroup = 8;
            attrs.topkGroup = 4;
        }
        attrs.activation = activationOf(v);
        if (attrs.activation == Activation::kClampedSwiGLU)
        {
            attrs.swigluAlpha = 1.702f;
            attrs.swigluLimit = 7.0f;
        }
        attrs.maxTokens = int64_t{1} << 40;
        SerializedFields fields;
        fields.fill(v, attrs);
        CHECK_EQ(fields.count(), static_cast<int32_t>(creatorFieldNames(v).size()) + 1);
        MoeAttrs parsed;
        std::string error;
        bool const ok = parseFields(v, fields.fields(), fields.count(), parsed, &error);
        CHECK(ok);
        if (!ok)
        {
            std::cerr << pluginName(v) << ": " << error << "\n";
        }
        CHECK(parsed == attrs);
        // Serializing twice from the same object gives views into its own storage.
        fields.fill(v, parsed);
        CHECK(parseFields(v, fields.fields(), fields.count(), parsed, &error));
        CHECK(parsed == attrs);
    }
    // What the ONNX parser gives: INT32 / FLOAT32 attributes, no max_tokens, unknown fields ignored.
    int32_t const topK = 8;
    int32_t const nCe = 4;
    int32_t const norm = 0;
    float const scale = 16.0f;
    char const text[] = "ce_export";
    FieldView const onnx[] = {
        {"top_k", &topK, FieldType::kINT32, 1},
        {"n_ce", &nCe, FieldType::kINT32, 1},
        {"norm_topk_prob", &norm, FieldType::kINT32, 1},
        {"routing_scale", &scale, FieldType::kFLOAT32, 1},
        {"plugin_namespace", text, FieldType::kCHAR, 9},
    };
    MoeAttrs attrs;
    std::string error;
    CHECK(parseFields(Variant::kCompressed, onnx, 5, attrs, &error));
    CHECK_EQ(attrs.topK, 8);
    CHECK_EQ(attrs.nCe, 4);
    CHECK_EQ(attrs.routingScale, 16.0f);
    CHECK_EQ(attrs.maxTokens, 0);
    CHECK(attrs.routing == Routing::kSoftmaxTopK);
    // INT64 attributes are accepted too; defaults fill the rest.
    int64_t const topK64 = 2;
    FieldView const wide[] = {{"top_k", &topK64, FieldType::kINT64, 1}};
    CHECK(parseFields(Variant::kPlain, wide, 1, attrs, &error));
    CHECK_EQ(attrs.topK, 2);
    CHECK_EQ(attrs.nCe, 0);
    CHECK_EQ(attrs.normTopkProb, 0);
    CHECK_EQ(attrs.routingScale, 1.0f);
    // SparseMixer: top_k is 2 without a field.
    float const eps = 0.01f;
    FieldView const sm[] = {{"jitter_eps", &eps, FieldType::kFLOAT32, 1}};
    CHECK(parseFields(Variant::kSparseMixer, sm, 1, attrs, &error));
    CHECK_EQ(attrs.topK, 2);
    CHECK(attrs.routing == Routing::kSparseMixer);
    CHECK_EQ(attrs.jitterEps, 0.01f);
    int32_t const one = 1;
    FieldView const csm[] = {{"n_ce", &one, FieldType::kINT32, 1}, {"jitter_eps", &eps, FieldType::kFLOAT32, 1}};
    CHECK(parseFields(Variant::kCompressedSparseMixer, csm, 2, attrs, &error));
    CHECK_EQ(attrs.nCe, 1);
    CHECK(!parseFields(Variant::kCompressedSparseMixer, sm, 1, attrs, &error)); // needs n_ce = 1
    FieldView const sm3[] = {{"top_k", &topK, FieldType::kINT32, 1}};
    CHECK(!parseFields(Variant::kSparseMixer, sm3, 1, attrs, &error));
    CHECK_CONTAINS(error, "top-2");
    // Errors.
    CHECK(!parseFields(Variant::kCompressed, onnx + 1, 2, attrs, &error));
    CHECK_CONTAINS(error, "missing field top_k");
    CHECK(!parseFields(Variant::kPlain, onnx, 2, attrs, &error));
    CHECK_CONTAINS(error, "n_ce=4");
    int32_t const badNce = 8;
    FieldView const bad[] = {{"top_k", &topK, FieldType::kINT32, 1}, {"n_ce", &badNce, FieldType::kINT32, 1}};
    CHECK(!parseFields(Variant::kCompressed, bad, 2, attrs, &error));
    CHECK_CONTAINS(error, "outside 1..7");
    CHECK(!parseFields(Variant::kCompressed, bad, 1, attrs, &error)); // CE needs n_ce >= 1
    float const f = 1.0f;
    FieldView const typed[] = {{"top_k", &f, FieldType::kFLOAT32, 1}};
    CHECK(!parseFields(Variant::kPlain, typed, 1, attrs, &error));
    CHECK_CONTAINS(error, "FLOAT32");
    FieldView const intScale[] = {{"top_k", &topK, FieldType::kINT32, 1}, {"routing_scale", &topK, FieldType::kINT32, 1}};
    CHECK(!parseFields(Variant::kPlain, intScale, 2, attrs, &error));
    CHECK_CONTAINS(error, "expected FLOAT32");
    float const inf = 1.0f / 0.0f;
    FieldView const infScale[] = {{"top_k", &topK, FieldType::kINT32, 1}, {"routing_scale", &inf, FieldType::kFLOAT32, 1}};
    CHECK(!parseFields(Variant::kPlain, infScale, 2, attrs, &error));
    int32_t const norm2 = 2;
    FieldView const badNorm[] = {{"top_k", &topK, FieldType::kINT32, 1}, {"norm_topk_prob", &norm2, FieldType::kINT32, 1}};
    CHECK(!parseFields(Variant::kPlain, badNorm, 2, attrs, &error));
    FieldView const empty[] = {{"top_k", nullptr, FieldType::kINT32, 0}};
    CHECK(!parseFields(Variant::kPlain, empty, 1, attrs, &error));

    // The sigmoid ops: CompressedSigmoidMoE's ONNX attributes (DeepSeek-V3: 8 groups, the best 4).
    int32_t const nGroup = 8;
    int32_t const topkGroup = 4;
    FieldView const sigmoid[] = {
        {"top_k", &topK, FieldType::kINT32, 1},
        {"n_ce", &nCe, FieldType::kINT32, 1},
        {"norm_topk_prob", &one, FieldType::kINT32, 1},
        {"routing_scale", &scale, FieldType::kFLOAT32, 1},
        {"n_group", &nGroup, FieldType::kINT32, 1},
        {"topk_group", &topkGroup, FieldType::kINT32, 1},
        {"jitter_eps", &eps, FieldType::kFLOAT32, 1}, // not a sigmoid attribute: ignored
    };
    CHECK(parseFields(Variant::kCompressedSigmoid, sigmoid, 7, attrs, &error));
    CHECK(attrs.routing == Routing::kSigmoidTopK);
    CHECK_EQ(attrs.topK, 8);
    CHECK_EQ(attrs.nCe, 4);
    CHECK_EQ(attrs.normTopkProb, 1);
    CHECK_EQ(attrs.routingScale, 16.0f);
    CHECK_EQ(attrs.nGroup, 8);
    CHECK_EQ(attrs.topkGroup, 4);
    CHECK_EQ(attrs.jitterEps, 0.0f);
    // Without the group fields: one group (GLM-4.5 without groups, dots1, MiniMax-M2).
    CHECK(parseFields(Variant::kSigmoid, sigmoid, 1, attrs, &error));
    CHECK_EQ(attrs.nGroup, 1);
    CHECK_EQ(attrs.topkGroup, 1);
    // SigmoidMoE has no n_ce; the groups are ignored on the other ops, like unknown fields.
    CHECK(!parseFields(Variant::kSigmoid, sigmoid, 7, attrs, &error));
    CHECK_CONTAINS(error, "SigmoidMoE has n_ce=4");
    FieldView const groupsOnSoftmax[] = {sigmoid[0], sigmoid[4], sigmoid[5]};
    CHECK(parseFields(Variant::kPlain, groupsOnSoftmax, 3, attrs, &error));
    CHECK_EQ(attrs.nGroup, 1);
    CHECK_EQ(attrs.topkGroup, 1);
    CHECK(parseFields(Variant::kSigmoid, groupsOnSoftmax, 3, attrs, &error));
    CHECK_EQ(attrs.nGroup, 8);
    // topk_group must be in 1..n_group.
    FieldView const tooManyGroups[] = {sigmoid[0], {"n_group", &topkGroup, FieldType::kINT32, 1},
        {"topk_group", &nGroup, FieldType::kINT32, 1}};
    CHECK(!parseFields(Variant::kSigmoid, tooManyGroups, 3, attrs, &error));
    CHECK_CONTAINS(error, "n_group=4, topk_group=8");
    int32_t const zero = 0;
    FieldView const noGroups[] = {sigmoid[0], {"n_group", &zero, FieldType::kINT32, 1}};
    CHECK(!parseFields(Variant::kSigmoid, noGroups, 2, attrs, &error));
    FieldView const floatGroups[] = {sigmoid[0], {"n_group", &scale, FieldType::kFLOAT32, 1}};
    CHECK(!parseFields(Variant::kSigmoid, floatGroups, 2, attrs, &error));
    CHECK_CONTAINS(error, "n_group has type FLOAT32");
    // Groups on a softmax layer's attributes are refused by validation (the parser never sets them).
    MoeAttrs grouped;
    grouped.topK = 2;
    grouped.nGroup = 2;
    CHECK(!validateAttrs(Variant::kPlain, grouped, &error));
    CHECK_CONTAINS(error, "need sigmoid routing");

    // The clamped ops: CompressedClampedSwiGLUMoE's ONNX attributes (gpt-oss: top-4, renormalised).
    float const alpha = 1.702f;
    float const limit = 7.0f;
    int32_t const four = 4;
    int32_t const two = 2;
    FieldView const clamped[] = {
        {"top_k", &four, FieldType::kINT32, 1},
        {"n_ce", &two, FieldType::kINT32, 1},
        {"norm_topk_prob", &one, FieldType::kINT32, 1},
        {"routing_scale", &f, FieldType::kFLOAT32, 1},
        {"swiglu_alpha", &alpha, FieldType::kFLOAT32, 1},
        {"swiglu_limit", &limit, FieldType::kFLOAT32, 1},
        {"n_group", &nGroup, FieldType::kINT32, 1}, // not a clamped attribute: ignored
    };
    CHECK(parseFields(Variant::kCompressedClamped, clamped, 7, attrs, &error));
    CHECK(attrs.routing == Routing::kSoftmaxTopK);
    CHECK(attrs.activation == Activation::kClampedSwiGLU);
    CHECK_EQ(attrs.topK, 4);
    CHECK_EQ(attrs.nCe, 2);
    CHECK_EQ(attrs.normTopkProb, 1);
    CHECK_EQ(attrs.swigluAlpha, 1.702f);
    CHECK_EQ(attrs.swigluLimit, 7.0f);
    CHECK_EQ(attrs.nGroup, 1);
    // ClampedSwiGLUMoE has no n_ce; swiglu_alpha / swiglu_limit are required (no default means anything).
    FieldView const plainClamped[] = {clamped[0], clamped[2], clamped[4], clamped[5]};
    CHECK(parseFields(Variant::kClamped, plainClamped, 4, attrs, &error));
    CHECK_EQ(attrs.nCe, 0);
    CHECK(!parseFields(Variant::kClamped, clamped, 7, attrs, &error));
    CHECK_CONTAINS(error, "ClampedSwiGLUMoE has n_ce=2");
    CHECK(!parseFields(Variant::kClamped, plainClamped, 3, attrs, &error));
    CHECK_CONTAINS(error, "missing field swiglu_limit");
    FieldView const noAlpha[] = {clamped[0], clamped[5]};
    CHECK(!parseFields(Variant::kClamped, noAlpha, 2, attrs, &error));
    CHECK_CONTAINS(error, "missing field swiglu_alpha");
    FieldView const intAlpha[] = {clamped[0], {"swiglu_alpha", &four, FieldType::kINT32, 1}, clamped[5]};
    CHECK(!parseFields(Variant::kClamped, intAlpha, 3, attrs, &error));
    CHECK_CONTAINS(error, "expected FLOAT32");
    FieldView const infLimit[] = {clamped[0], clamped[4], {"swiglu_limit", &inf, FieldType::kFLOAT32, 1}};
    CHECK(!parseFields(Variant::kClamped, infLimit, 3, attrs, &error));
    CHECK_CONTAINS(error, "must be finite");
    // On the other ops they are ignored like unknown fields, and refused by validation if set.
    CHECK(parseFields(Variant::kPlain, plainClamped, 4, attrs, &error));
    CHECK(attrs.activation == Activation::kSwiGLU);
    CHECK_EQ(attrs.swigluAlpha, 1.0f);
    CHECK_EQ(attrs.swigluLimit, 0.0f);
    MoeAttrs limited;
    limited.topK = 2;
    limited.swigluLimit = 7.0f;
    CHECK(!validateAttrs(Variant::kPlain, limited, &error));
    CHECK_CONTAINS(error, "need the clamped SwiGLU");
    // The activation comes from the op type: a clamped layer's attributes do not fit MoE, nor the reverse.
    MoeAttrs gptOss = clampedAttrs();
    CHECK(validateAttrs(Variant::kCompressedClamped, gptOss, &error));
    CHECK(!validateAttrs(Variant::kCompressed, gptOss, &error));
    CHECK_CONTAINS(error, "activation clamped_swiglu does not match the op type");
    gptOss.activation = Activation::kSwiGLU;
    CHECK(!validateAttrs(Variant::kCompressedClamped, gptOss, &error));
}

TEST_CASE(creator_field_names)
{
    auto names = [](Variant v) {
        std::string out;
        for (FieldView const& f : creatorFieldNames(v))
        {
            out += std::string(out.empty() ? "" : ",") + f.name + (f.type == FieldType::kINT32 ? ":i" : ":f");
        }
        return out;
    };
    CHECK_EQ(names(Variant::kPlain), std::string("top_k:i,norm_topk_prob:i,routing_scale:f"));
    CHECK_EQ(names(Variant::kCompressed), std::string("top_k:i,n_ce:i,norm_topk_prob:i,routing_scale:f"));
    CHECK_EQ(names(Variant::kSparseMixer), std::string("jitter_eps:f"));
    CHECK_EQ(names(Variant::kCompressedSparseMixer), std::string("n_ce:i,jitter_eps:f"));
    CHECK_EQ(names(Variant::kSigmoid),
        std::string("top_k:i,norm_topk_prob:i,routing_scale:f,n_group:i,topk_group:i"));
    CHECK_EQ(names(Variant::kCompressedSigmoid),
        std::string("top_k:i,n_ce:i,norm_topk_prob:i,routing_scale:f,n_group:i,topk_group:i"));
    CHECK_EQ(names(Variant::kClamped),
        std::string("top_k:i,norm_topk_prob:i,routing_scale:f,swiglu_alpha:f,swiglu_limit:f"));
    CHECK_EQ(names(Variant::kCompressedClamped),
        std::string("top_k:i,n_ce:i,norm_topk_prob:i,routing_scale:f,swiglu_alpha:f,swiglu_limit:f"));
    CHECK_EQ(std::string(pluginName(Variant::kClamped)), std::string("ClampedSwiGLUMoE"));
    CHECK_EQ(std::string(pluginName(Variant::kCompressedClamped)), std::string("CompressedClampedSwiGLUMoE"));
    CHECK_EQ(std::string(routingName(routingOf(Variant::kCompressedClamped))), std::string("softmax_topk"));
    CHECK_EQ(std::string(activationName(activationOf(Variant::kClamped))), std::string("clamped_swiglu"));
    CHECK(activationOf(Variant::kSigmoid) == Activation::kSwiGLU);
    CHECK(isCompressed(Variant::kCompressedClamped) && !isCompressed(Variant::kClamped));
    // gate_up_bias, down_bias are the last two inputs (onnx_functions.ClampedSwiGLUMoE /
    // CompressedClampedSwiGLUMoE), after ces.
    CHECK_EQ(numInputs(Variant::kClamped), 6);
    CHECK_EQ(numInputs(Variant::kCompressedClamped), 7);
    CHECK_EQ(gateUpBiasInput(Variant::kClamped), 4);
    CHECK_EQ(downBiasInput(Variant::kClamped), 5);
    CHECK_EQ(gateUpBiasInput(Variant::kCompressedClamped), 5);
    CHECK_EQ(downBiasInput(Variant::kCompressedClamped), 6);
    CHECK_EQ(gateUpBiasInput(Variant::kCompressedSigmoid), -1);
    CHECK_EQ(downBiasInput(Variant::kPlain), -1);
    CHECK_EQ(scoreBiasInput(Variant::kClamped), -1);
    CHECK(inputBuffer(Variant::kClamped, 4) == kBufGateUpBias);
    CHECK(inputBuffer(Variant::kClamped, 5) == kBufDownBias);
    CHECK(inputBuffer(Variant::kCompressedClamped, 4) == kBufCes);
    CHECK(inputBuffer(Variant::kCompressedClamped, 5) == kBufGateUpBias);
    CHECK(inputBuffer(Variant::kCompressedClamped, 6) == kBufDownBias);
    CHECK_EQ(std::string(inputName(Variant::kCompressedClamped, 6)), std::string("down_bias"));
    CHECK_EQ(std::string(inputName(Variant::kCompressedSigmoid, 5)), std::string("score_bias"));
    CHECK(hasInputBuffer(Variant::kClamped, kBufDownBias) && !hasInputBuffer(Variant::kClamped, kBufCes));
    CHECK(!hasInputBuffer(Variant::kCompressed, kBufGateUpBias) && !hasInputBuffer(Variant::kSigmoid, kBufDownBias));
    CHECK_EQ(std::string(pluginName(Variant::kSigmoid)), std::string("SigmoidMoE"));
    CHECK_EQ(std::string(pluginName(Variant::kCompressedSigmoid)), std::string("CompressedSigmoidMoE"));
    CHECK_EQ(std::string(routingName(routingOf(Variant::kCompressedSigmoid))), std::string("sigmoid_topk"));
    CHECK(isCompressed(Variant::kCompressedSigmoid) && !isCompressed(Variant::kSigmoid));
    // score_bias is the last input (onnx_functions.SigmoidMoE / CompressedSigmoidMoE), after ces.
    CHECK_EQ(numInputs(Variant::kSigmoid), 5);
    CHECK_EQ(numInputs(Variant::kCompressedSigmoid), 6);
    CHECK_EQ(scoreBiasInput(Variant::kSigmoid), 4);
    CHECK_EQ(scoreBiasInput(Variant::kCompressedSigmoid), 5);
    CHECK_EQ(scoreBiasInput(Variant::kCompressed), -1);
    CHECK_EQ(scoreBiasInput(Variant::kSparseMixer), -1);
    CHECK(inputBuffer(Variant::kSigmoid, 4) == kBufScoreBias);
    CHECK(inputBuffer(Variant::kCompressedSigmoid, 4) == kBufCes);
    CHECK(inputBuffer(Variant::kCompressedSigmoid, 5) == kBufScoreBias);
    CHECK(inputBuffer(Variant::kCompressed, 4) == kBufCes);
    for (Variant v : kAllVariants)
    {
        for (int32_t i = 0; i < numInputs(v); ++i)
        {
            CHECK(inputBuffer(v, i) >= 0 && inputBuffer(v, i) < kBufOut);
        }
        CHECK(numInputs(v) <= kMaxInputs);
    }
    CHECK_EQ(std::string(pluginName(Variant::kPlain)), std::string("MoE"));
    CHECK_EQ(std::string(pluginName(Variant::kCompressed)), std::string("CompressedMoE"));
    CHECK_EQ(std::string(pluginName(Variant::kSparseMixer)), std::string("SparseMixerMoE"));
    CHECK_EQ(std::string(pluginName(Variant::kCompressedSparseMixer)), std::string("CompressedSparseMixerMoE"));
    CHECK_EQ(numInputs(Variant::kPlain), 4);
    CHECK_EQ(numInputs(Variant::kCompressed), 5);
    CHECK_EQ(numInputs(Variant::kSparseMixer), 4);
    CHECK_EQ(numInputs(Variant::kCompressedSparseMixer), 5);
    CHECK_EQ(std::string(kPluginNamespace), std::string("ce_export"));
    CHECK_EQ(std::string(kPluginVersion), std::string("1"));
}

TEST_CASE(shape_rules)
{
    std::string error;
    LayerDims dims;
    Shape ce[] = {Shape::of({7, 2048}), Shape::of({7, 64}), Shape::of({64, 2048, 2048}), Shape::of({64, 2048, 1024}),
        Shape::of({64, 3, 2048})};
    CHECK(checkShapes(Variant::kCompressed, ce, 5, dims, &error));
    CHECK_EQ(dims.T, 7);
    CHECK_EQ(dims.H, 2048);
    CHECK_EQ(dims.I, 1024);
    CHECK_EQ(dims.E, 64);
    CHECK_EQ(dims.C, 2048);
    CHECK(!checkShapes(Variant::kPlain, ce, 5, dims, &error));
    CHECK_CONTAINS(error, "takes 4 inputs");
    CHECK(checkShapes(Variant::kPlain, ce, 4, dims, &error));
    CHECK_EQ(dims.C, 0);

    // [B, S, H] hidden, unknown dims (build time: -1).
    Shape batched[] = {Shape::of({-1, 5, 128}), Shape::of({-1, 5, 8}), Shape::of({8, 128, 128}), Shape::of({8, 128, 64})};
    CHECK(checkShapes(Variant::kPlain, batched, 4, dims, &error));
    CHECK_EQ(dims.T, -1);
    CHECK_EQ(dims.I, 64);
    batched[0].d[0] = 3;
    CHECK(checkShapes(Variant::kPlain, batched, 4, dims, &error));
    CHECK_EQ(dims.T, 15);

    Shape out = outputShape(ce[0]);
    CHECK_EQ(out.rank, 2);
    CHECK_EQ(out.d[0], 7);
    CHECK_EQ(out.d[1], 2048);

    Shape bad[5];
    auto reset = [&] {
        for (int i = 0; i < 5; ++i)
        {
            bad[i] = ce[i];
        }
    };
    reset();
    bad[kCes] = Shape::of({64, 3, 1000}); // C < H
    CHECK(!checkShapes(Variant::kCompressed, bad, 5, dims, &error));
    CHECK_CONTAINS(error, ">= max(H, I)");
    reset();
    bad[kCes] = Shape::of({64, 2, 2048});
    CHECK(!checkShapes(Variant::kCompressed, bad, 5, dims, &error));
    reset();
    bad[kRouterLogits] = Shape::of({7, 32}); // E mismatch
    CHECK(!checkShapes(Variant::kCompressed, bad, 5, dims, &error));
    CHECK_CONTAINS(error, "inconsistent");
    reset();
    bad[kRouterLogits] = Shape::of({6, 64}); // T mismatch
    CHECK(!checkShapes(Variant::kCompressed, bad, 5, dims, &error));
    reset();
    bad[kGateUp] = Shape::of({64, 2047, 2048});
    CHECK(!checkShapes(Variant::kCompressed, bad, 5, dims, &error));
    CHECK_CONTAINS(error, "even");
    reset();
    bad[kGateUp] = Shape::of({64, 2000, 2048}); // 2I = 2000 != 2 * 1024
    CHECK(!checkShapes(Variant::kCompressed, bad, 5, dims, &error));
    reset();
    bad[kHidden] = Shape::of({7, 2040}); // H not a multiple of 16 (everything consistent)
    bad[kGateUp] = Shape::of({64, 2048, 2040});
    bad[kDown] = Shape::of({64, 2040, 1024});
    CHECK(!checkShapes(Variant::kCompressed, bad, 5, dims, &error));
    CHECK_CONTAINS(error, "multiple of 16");
    reset();
    bad[kHidden] = Shape::of({2048});
    CHECK(!checkShapes(Variant::kCompressed, bad, 5, dims, &error));
    CHECK_CONTAINS(error, "rank");
    reset();
    bad[kDown] = Shape::of({64, 2048});
    CHECK(!checkShapes(Variant::kCompressed, bad, 5, dims, &error));

    // The sigmoid ops: score_bias [E] last.
    Shape sigmoid[] = {ce[0], ce[1], ce[2], ce[3], ce[4], Shape::of({64})};
    CHECK(checkShapes(Variant::kCompressedSigmoid, sigmoid, 6, dims, &error));
    CHECK_EQ(dims.E, 64);
    CHECK_EQ(dims.C, 2048);
    CHECK(!checkShapes(Variant::kCompressedSigmoid, sigmoid, 5, dims, &error));
    CHECK_CONTAINS(error, "takes 6 inputs");
    Shape plainSigmoid[] = {ce[0], ce[1], ce[2], ce[3], Shape::of({64})};
    CHECK(checkShapes(Variant::kSigmoid, plainSigmoid, 5, dims, &error));
    CHECK_EQ(dims.C, 0);
    CHECK(!checkShapes(Variant::kSigmoid, sigmoid, 5, dims, &error)); // ces where score_bias belongs
    CHECK_CONTAINS(error, "score_bias [64, 3, 2048] must be [E] with E = 64");
    for (Shape const& wrong : {Shape::of({32}), Shape::of({1, 64}), Shape::of({}), Shape::of({65})})
    {
        sigmoid[5] = wrong;
        CHECK(!checkShapes(Variant::kCompressedSigmoid, sigmoid, 6, dims, &error));
        CHECK_CONTAINS(error, "score_bias");
    }
    sigmoid[5] = Shape::of({-1}); // unknown at build time: E comes from the others
    CHECK(checkShapes(Variant::kCompressedSigmoid, sigmoid, 6, dims, &error));
    CHECK_EQ(dims.E, 64);
    // score_bias alone can tell E.
    Shape unknownE[] = {Shape::of({7, 2048}), Shape::of({7, -1}), Shape::of({-1, 2048, 2048}),
        Shape::of({-1, 2048, 1024}), Shape::of({16})};
    CHECK(checkShapes(Variant::kSigmoid, unknownE, 5, dims, &error));
    CHECK_EQ(dims.E, 16);

    // The rules between the groups and E (moe_math.check_moe_arguments').
    MoeAttrs groups;
    groups.routing = Routing::kSigmoidTopK;
    groups.topK = 8;
    groups.nGroup = 8;
    groups.topkGroup = 4;
    CHECK(checkExpertGroups(Variant::kSigmoid, groups, 256, &error)); // DeepSeek-V3
    CHECK(checkExpertGroups(Variant::kSigmoid, groups, 16, &error));  // 4 groups of 2 = 8 experts kept
    CHECK(!checkExpertGroups(Variant::kSigmoid, groups, 100, &error));
    CHECK_CONTAINS(error, "100 experts do not split into n_group=8 equal groups of at least 2");
    CHECK(!checkExpertGroups(Variant::kSigmoid, groups, 8, &error)); // groups of 1
    groups.topK = 9;
    CHECK(!checkExpertGroups(Variant::kSigmoid, groups, 16, &error));
    CHECK_CONTAINS(error, "top_k=9 exceeds the 8 experts of the kept groups");
    groups.nGroup = 1;
    groups.topkGroup = 1;
    CHECK(checkExpertGroups(Variant::kSigmoid, groups, 9, &error));
    CHECK(!checkExpertGroups(Variant::kSigmoid, groups, 8, &error)); // top_k > E
    CHECK(checkExpertGroups(Variant::kSigmoid, groups, -1, &error)); // E unknown: nothing to check yet
    CHECK(checkExpertGroups(Variant::kPlain, groups, 8, &error));    // not a sigmoid op

    // The clamped ops: gate_up_bias [E, 2I] and down_bias [E, H] last (gpt-oss-20b's H = I = 2880).
    Shape clamped[] = {Shape::of({7, 2880}), Shape::of({7, 32}), Shape::of({32, 5760, 2880}),
        Shape::of({32, 2880, 2880}), Shape::of({32, 3, 2880}), Shape::of({32, 5760}), Shape::of({32, 2880})};
    CHECK(checkShapes(Variant::kCompressedClamped, clamped, 7, dims, &error));
    CHECK_EQ(dims.E, 32);
    CHECK_EQ(dims.I, 2880);
    CHECK_EQ(dims.C, 2880);
    Shape plainClamped[] = {clamped[0], clamped[1], clamped[2], clamped[3], clamped[5], clamped[6]};
    CHECK(checkShapes(Variant::kClamped, plainClamped, 6, dims, &error));
    CHECK_EQ(dims.C, 0);
    CHECK(!checkShapes(Variant::kClamped, clamped, 6, dims, &error)); // ces where gate_up_bias belongs
    CHECK_CONTAINS(error, "gate_up_bias [32, 3, 2880] and down_bias [32, 5760]");
    CHECK(!checkShapes(Variant::kCompressedClamped, plainClamped, 6, dims, &error));
    CHECK_CONTAINS(error, "takes 7 inputs");
    for (Shape const& wrong : {Shape::of({32, 2880}), Shape::of({16, 5760}), Shape::of({32, 5759}), Shape::of({5760}),
             Shape::of({32, 2, 2880})})
    {
        Shape bad[] = {clamped[0], clamped[1], clamped[2], clamped[3], wrong, clamped[6]};
        CHECK(!checkShapes(Variant::kClamped, bad, 6, dims, &error));
        CHECK_CONTAINS(error, "must be [E, 2I] and [E, H]");
    }
    for (Shape const& wrong : {Shape::of({32, 5760}), Shape::of({31, 2880}), Shape::of({2880})})
    {
        Shape bad[] = {clamped[0], clamped[1], clamped[2], clamped[3], clamped[5], wrong};
        CHECK(!checkShapes(Variant::kClamped, bad, 6, dims, &error));
        CHECK_CONTAINS(error, "must be [E, 2I] and [E, H]");
    }
    // The biases alone can tell E, I and H.
    Shape fromBiases[] = {Shape::of({7, -1}), Shape::of({7, -1}), Shape::of({-1, -1, -1}), Shape::of({-1, -1, -1}),
        Shape::of({32, 5760}), Shape::of({32, 2880})};
    CHECK(checkShapes(Variant::kClamped, fromBiases, 6, dims, &error));
    CHECK_EQ(dims.E, 32);
    CHECK_EQ(dims.I, 2880);
    CHECK_EQ(dims.H, 2880);
}

TEST_CASE(type_rules)
{
    std::string error;
    DType const bf16[] = {DType::kBF16, DType::kBF16, DType::kBF16, DType::kBF16, DType::kBF16};
    CHECK(checkTypes(Variant::kCompressed, bf16, 5, &error));
    CHECK(outputType(bf16, 5) == DType::kBF16);
    DType const fp32Logits[] = {DType::kFP16, DType::kFP32, DType::kFP16, DType::kFP16};
    CHECK(checkTypes(Variant::kPlain, fp32Logits, 4, &error));
    CHECK(outputType(fp32Logits, 4) == DType::kFP16);
    DType const fp32[] = {DType::kFP32, DType::kFP32, DType::kFP32, DType::kFP32};
    CHECK(checkTypes(Variant::kPlain, fp32, 4, &error));
    DType const mixedLogits[] = {DType::kBF16, DType::kFP16, DType::kBF16, DType::kBF16};
    CHECK(!checkTypes(Variant::kPlain, mixedLogits, 4, &error));
    CHECK_CONTAINS(error, "router_logits is fp16");
    DType const mixedWeights[] = {DType::kBF16, DType::kBF16, DType::kBF16, DType::kFP16};
    CHECK(!checkTypes(Variant::kPlain, mixedWeights, 4, &error));
    CHECK_CONTAINS(error, "down is fp16");
    DType const ints[] = {DType::kINT32, DType::kINT32, DType::kINT32, DType::kINT32};
    CHECK(!checkTypes(Variant::kPlain, ints, 4, &error));
    CHECK(!checkTypes(Variant::kCompressed, bf16, 4, &error));
    CHECK_EQ(dtypeSize(DType::kBF16), size_t{2});
    // score_bias is fp32 whatever the activations (capture.parameter_dtype keeps it fp32).
    DType const sigmoid[] = {DType::kBF16, DType::kFP32, DType::kBF16, DType::kBF16, DType::kBF16, DType::kFP32};
    CHECK(checkTypes(Variant::kCompressedSigmoid, sigmoid, 6, &error));
    CHECK(outputType(sigmoid, 6) == DType::kBF16);
    CHECK(!checkTypes(Variant::kSigmoid, sigmoid, 5, &error)); // ces bf16 where score_bias belongs
    CHECK_CONTAINS(error, "score_bias is bf16; must be fp32");
    DType const plainSigmoid[] = {DType::kFP16, DType::kFP16, DType::kFP16, DType::kFP16, DType::kFP32};
    CHECK(checkTypes(Variant::kSigmoid, plainSigmoid, 5, &error));
    DType const bf16Bias[] = {DType::kBF16, DType::kFP32, DType::kBF16, DType::kBF16, DType::kBF16, DType::kBF16};
    CHECK(!checkTypes(Variant::kCompressedSigmoid, bf16Bias, 6, &error));
    CHECK_CONTAINS(error, "score_bias is bf16");
    DType const fp32Ces[] = {DType::kBF16, DType::kFP32, DType::kBF16, DType::kBF16, DType::kFP32, DType::kFP32};
    CHECK(!checkTypes(Variant::kCompressedSigmoid, fp32Ces, 6, &error));
    CHECK_CONTAINS(error, "ces is fp32");
    // gate_up_bias and down_bias have hidden's type (capture.parameter_dtype: the model's dtype).
    DType const clamped[] = {DType::kBF16, DType::kFP32, DType::kBF16, DType::kBF16, DType::kBF16, DType::kBF16,
        DType::kBF16};
    CHECK(checkTypes(Variant::kCompressedClamped, clamped, 7, &error));
    CHECK(checkTypes(Variant::kClamped, clamped, 6, &error));
    DType const fp32GateUpBias[] = {DType::kBF16, DType::kBF16, DType::kBF16, DType::kBF16, DType::kFP32, DType::kBF16};
    CHECK(!checkTypes(Variant::kClamped, fp32GateUpBias, 6, &error));
    CHECK_CONTAINS(error, "gate_up_bias is fp32; must be bf16");
    DType const fp16DownBias[] = {DType::kBF16, DType::kBF16, DType::kBF16, DType::kBF16, DType::kBF16, DType::kBF16,
        DType::kFP16};
    CHECK(!checkTypes(Variant::kCompressedClamped, fp16DownBias, 7, &error));
    CHECK_CONTAINS(error, "down_bias is fp16; must be bf16");
}

TEST_CASE(format_combinations)
{
    MoeAttrs attrs;
    attrs.topK = 4;
    attrs.nCe = 2;
    auto combo = [](DType act, DType logits, DType weights, DType out, bool linear = true) {
        std::vector<TensorTypeFormat> v = {{act, linear}, {logits, true}, {weights, true}, {weights, true},
            {weights, true}, {out, true}};
        return v;
    };
    auto allOk = [&](std::vector<TensorTypeFormat> const& c, KernelLibrary const* lib) {
        for (int32_t pos = 0; pos < 6; ++pos)
        {
            if (!supportsCombination(Variant::kCompressed, attrs, pos, c.data(), 5, 1, lib))
            {
                return false;
            }
        }
        return true;
    };
    // Pure type rules (no library).
    CHECK(allOk(combo(DType::kBF16, DType::kBF16, DType::kBF16, DType::kBF16), nullptr));
    CHECK(allOk(combo(DType::kFP32, DType::kFP32, DType::kFP32, DType::kFP32), nullptr));
    CHECK(allOk(combo(DType::kFP16, DType::kFP32, DType::kFP16, DType::kFP16), nullptr));
    CHECK(!allOk(combo(DType::kFP16, DType::kBF16, DType::kFP16, DType::kFP16), nullptr));
    CHECK(!allOk(combo(DType::kBF16, DType::kBF16, DType::kBF16, DType::kFP32), nullptr));
    CHECK(!allOk(combo(DType::kBF16, DType::kBF16, DType::kBF16, DType::kBF16, false), nullptr));
    CHECK(!allOk(combo(DType::kINT32, DType::kINT32, DType::kINT32, DType::kINT32), nullptr));
    CHECK(!supportsCombination(Variant::kCompressed, attrs, 0, combo(DType::kBF16, DType::kBF16, DType::kBF16, DType::kBF16).data(), 4, 1, nullptr));
    // The CE fixture has bf16 and fp16 kernels (with fp32-logits routing twins), no fp32 ones.
    KernelLibrary const& lib = ceLibrary();
    CHECK(allOk(combo(DType::kBF16, DType::kBF16, DType::kBF16, DType::kBF16), &lib));
    CHECK(allOk(combo(DType::kFP16, DType::kFP16, DType::kFP16, DType::kFP16), &lib));
    CHECK(!allOk(combo(DType::kFP32, DType::kFP32, DType::kFP32, DType::kFP32), &lib));
    CHECK(allOk(combo(DType::kBF16, DType::kFP32, DType::kBF16, DType::kBF16), &lib));
    // The SparseMixer fixture was compiled for fp16 only.
    MoeAttrs sparse;
    sparse.routing = Routing::kSparseMixer;
    sparse.topK = 2;
    sparse.jitterEps = 0.01f;
    auto const bf16 = combo(DType::kBF16, DType::kBF16, DType::kBF16, DType::kBF16);
    CHECK(!supportsCombination(Variant::kSparseMixer, sparse, 0, bf16.data(), 4, 1, &sparseMixerLibrary()));
    // Attributes the library has no set for: fall back to type rules (configurePlugin explains).
    MoeAttrs other = attrs;
    other.topK = 8;
    auto c = combo(DType::kFP32, DType::kFP32, DType::kFP32, DType::kFP32);
    CHECK(supportsCombination(Variant::kCompressed, other, 0, c.data(), 5, 1, &lib));
    // The synthetic library has a routing kernel for fp32 logits.
    MoeAttrs synth;
    synth.topK = 2;
    synth.nCe = 1;
    synth.normTopkProb = 1;
    auto s = combo(DType::kBF16, DType::kFP32, DType::kBF16, DType::kBF16);
    CHECK(supportsCombination(Variant::kCompressed, synth, 1, s.data(), 5, 1, &syntheticLibrary()));

    // CompressedSigmoidMoE: score_bias (input 5) fp32, the output (position 6) the activation type.
    MoeAttrs const sigmoid = sigmoidAttrs();
    auto sigmoidCombo = [](DType act, DType logits, DType bias) {
        return std::vector<TensorTypeFormat>{{act, true}, {logits, true}, {act, true}, {act, true}, {act, true},
            {bias, true}, {act, true}};
    };
    auto sigmoidOk = [&](std::vector<TensorTypeFormat> const& c, KernelLibrary const* library) {
        for (int32_t pos = 0; pos < 7; ++pos)
        {
            if (!supportsCombination(Variant::kCompressedSigmoid, sigmoid, pos, c.data(), 6, 1, library))
            {
                return false;
            }
        }
        return true;
    };
    CHECK(sigmoidOk(sigmoidCombo(DType::kBF16, DType::kFP32, DType::kFP32), nullptr));
    CHECK(sigmoidOk(sigmoidCombo(DType::kFP16, DType::kFP16, DType::kFP32), nullptr));
    CHECK(!sigmoidOk(sigmoidCombo(DType::kBF16, DType::kFP32, DType::kBF16), nullptr));
    // The sigmoid fixture: bf16 with bf16 or fp32 router logits (its twin), nothing for fp16.
    CHECK(sigmoidOk(sigmoidCombo(DType::kBF16, DType::kFP32, DType::kFP32), &sigmoidLibrary()));
    CHECK(sigmoidOk(sigmoidCombo(DType::kBF16, DType::kBF16, DType::kFP32), &sigmoidLibrary()));
    CHECK(!sigmoidOk(sigmoidCombo(DType::kFP16, DType::kFP16, DType::kFP32), &sigmoidLibrary()));
    auto const plainSigmoid = std::vector<TensorTypeFormat>{{DType::kBF16, true}, {DType::kFP32, true},
        {DType::kBF16, true}, {DType::kBF16, true}, {DType::kFP32, true}, {DType::kBF16, true}};
    CHECK(supportsCombination(Variant::kSigmoid, sigmoid, 4, plainSigmoid.data(), 5, 1, nullptr));
    CHECK(supportsCombination(Variant::kSigmoid, sigmoid, 5, plainSigmoid.data(), 5, 1, nullptr));
    CHECK(!supportsCombination(Variant::kSigmoid, sigmoid, 4, plainSigmoid.data(), 6, 1, nullptr));
}

TEST_CASE(select_arch)
{
    std::vector<int32_t> const archs = {80, 90};
    CHECK_EQ(selectArch(archs, 80), 80);
    CHECK_EQ(selectArch(archs, 86), 80);
    CHECK_EQ(selectArch(archs, 89), 80);
    CHECK_EQ(selectArch(archs, 90), 90);
    CHECK_EQ(selectArch(archs, 100), -1); // sm_90a cubins do not run on Blackwell
    CHECK_EQ(selectArch(archs, 120), -1);
    CHECK_EQ(selectArch(archs, 75), -1);
    std::vector<int32_t> const more = {80, 86, 90, 100};
    CHECK_EQ(selectArch(more, 87), 86);
    CHECK_EQ(selectArch(more, 100), 100);
    CHECK_EQ(selectArch(more, 103), -1);
    CHECK_EQ(selectArch({}, 90), -1);
}

TEST_CASE(manifest_fixture_ce)
{
    KernelLibrary const& lib = ceLibrary();
    CHECK_EQ(lib.sets().size(), size_t{1});
    CHECK_CONTAINS(lib.describe(), "softmax_topk top_k=4 n_ce=2 norm_topk_prob=0 routing_scale=1 E={8} dtypes={bf16,fp16} sm={80,90}");
    MoeAttrs attrs;
    attrs.topK = 4;
    attrs.nCe = 2;
    CHECK_EQ(lib.findSet(attrs, 8), 0);
    CHECK_EQ(lib.findSet(attrs, 16), -1);
    CHECK_EQ(lib.findSet(attrs, -1), 0);
    attrs.normTopkProb = 1;
    CHECK_EQ(lib.findSet(attrs, 8), -1);
    attrs.normTopkProb = 0;
    attrs.routingScale = 2.0f; // compiled into the routing kernel: must match
    CHECK_EQ(lib.findSet(attrs, 8), -1);
    CHECK(lib.archs() == std::vector<int32_t>({80, 90}));

    struct Expect
    {
        int64_t tokens;
        int64_t blockM;
        int64_t gateBlockN;
        int64_t downBlockN;
        char const* gateStem;
    };
    for (Expect const e : {Expect{1, 16, 64, 64, "gate_up_swiglu_bf16_ce_bm16_bn64_bk128_w4_s3_g1_swap"},
             Expect{32, 16, 64, 64, "gate_up_swiglu_bf16_ce_bm16_bn64_bk128_w4_s3_g1_swap"},
             Expect{33, 16, 64, 128, "gate_up_swiglu_bf16_ce_bm16_bn64_bk128_w4_s3_g4_swap"},
             Expect{1024, 32, 64, 128, "gate_up_swiglu_bf16_ce_bm32_bn64_bk64_w4_s4_g8_swap"},
             Expect{5000, 64, 128, 128, "gate_up_swiglu_bf16_ce_bm64_bn128_bk64_w8_s3_g8"}})
    {
        LaunchPlan plan;
        std::string error;
        PlanRequest req = ceRequest(e.tokens);
        bool const ok = buildLaunchPlan(lib, req, plan, &error);
        CHECK(ok);
        if (!ok)
        {
            std::cerr << error << "\n";
            continue;
        }
        int64_t const T = e.tokens;
        int64_t const H = 128;
        int64_t const I = 64;
        int64_t const E = 8;
        int64_t const C = 128;
        int64_t const K = 4;
        int64_t const KM = 2;
        CHECK_EQ(plan.numLaunches, 7);
        CHECK_EQ(stemOf(lib, plan, 0), std::string("topk_softmax_bf16_e8"));
        CHECK_EQ(stemOf(lib, plan, 1), std::string("mix_compressed_experts_bf16"));
        CHECK_EQ(stemOf(lib, plan, 2), std::string("count_pairs_per_expert_e8"));
        CHECK_EQ(stemOf(lib, plan, 3), "scatter_pairs_by_expert_bm" + std::to_string(e.blockM) + "_e8");
        CHECK_EQ(stemOf(lib, plan, 4), std::string(e.gateStem));
        CHECK_EQ(stemOf(lib, plan, 6), std::string("sum_main_slots_bf16"));
        for (int32_t i = 0; i < plan.numLaunches; ++i)
        {
            KernelLaunch const& l = plan.launches[i];
            CHECK_EQ(lib.set(plan.set).kernels[l.kernel].images[l.image].arch, 90);
        }

        KernelLaunch const& route = plan.launches[0];
        CHECK_EQ(route.grid[0], static_cast<uint32_t>(cdiv(T, 16)));
        CHECK_EQ(route.grid[1], 1u);
        CHECK_EQ(route.block, 128u);
        CHECK_EQ(route.numArgs, 6 + 2);
        CHECK_EQ(route.args[0].buffer, static_cast<int32_t>(kBufRouterLogits));
        CHECK_EQ(route.args[1].buffer, kNumIoBuffers + 0); // routing_weights
        CHECK_EQ(route.args[2].buffer, kNumIoBuffers + 1); // expert_ids
        CHECK_EQ(route.args[3].value, T);
        CHECK_EQ(route.args[4].value, E);
        CHECK_EQ(route.args[5].value, E);
        CHECK_EQ(route.args[6].buffer, -1);
        CHECK_EQ(route.args[7].buffer, -1);

        KernelLaunch const& theta = plan.launches[1];
        CHECK_EQ(theta.grid[0], static_cast<uint32_t>(cdiv(T, 8)));
        CHECK_EQ(theta.grid[1], static_cast<uint32_t>(cdiv(C, 256)));
        CHECK_EQ(theta.args[0].buffer, kNumIoBuffers + 0); // routing_weights + KM
        CHECK_EQ(theta.args[0].value, KM * 4);
        CHECK(!theta.args[0].aligned16);
        CHECK_EQ(theta.args[1].value, KM * 4); // expert_ids + KM (int32)
        CHECK_EQ(theta.args[2].buffer, static_cast<int32_t>(kBufCes));
        CHECK_EQ(theta.args[3].buffer, kNumIoBuffers + 2); // theta
        CHECK_EQ(theta.args[5].value, C);
        CHECK_EQ(theta.args[7].value, 3 * C);

        CHECK_EQ(plan.launches[2].grid[0], static_cast<uint32_t>(E));
        CHECK_EQ(plan.launches[3].grid[0], static_cast<uint32_t>(E));

        KernelLaunch const& gate = plan.launches[4];
        int64_t const blocks = maxBlocks(T * KM, E, e.blockM);
        CHECK_EQ(gate.grid[0], static_cast<uint32_t>(blocks * cdiv(I, e.gateBlockN)));
        CHECK_EQ(gate.numArgs, 17 + 2); // the kernel's arguments (gate_up_bias_ptr included), 2 scratch pointers
        CHECK_EQ(gate.args[0].buffer, static_cast<int32_t>(kBufHidden));
        CHECK(gate.args[0].aligned16);
        CHECK_EQ(gate.args[1].buffer, kNumIoBuffers + 2); // theta
        CHECK_EQ(gate.args[3].buffer, kNumIoBuffers + 7); // act
        CHECK_EQ(gate.args[argIndex(lib, plan, 4, "num_pairs")].value, T * KM);
        CHECK_EQ(gate.args[argIndex(lib, plan, 4, "stride_w_e")].value, 2 * I * H);
        CHECK(gate.block == 128u || gate.block == 256u);

        KernelLaunch const& down = plan.launches[5];
        CHECK_EQ(down.grid[0], static_cast<uint32_t>(blocks * cdiv(H, e.downBlockN)));
        CHECK_EQ(down.args[3].buffer, kNumIoBuffers + 8); // pair_out
        CHECK_EQ(down.args[argIndex(lib, plan, 5, "stride_routing_t")].value, K);

        KernelLaunch const& combine = plan.launches[6];
        CHECK_EQ(combine.grid[0], static_cast<uint32_t>(cdiv(T, 4))); // BLOCK_T = 4 in this snapshot
        CHECK_EQ(combine.grid[1], static_cast<uint32_t>(cdiv(H, 256)));
        CHECK_EQ(combine.args[1].buffer, static_cast<int32_t>(kBufOut));
        CHECK_EQ(combine.args[2].value, T);

        // Workspace: the manifest's buffers in order, 256-aligned, sized with the worst BLOCK_M.
        WorkspaceLayout const& ws = plan.workspace;
        CHECK_EQ(ws.count, 9);
        int64_t worstPadded = 0;
        int64_t worstBlocks = 0;
        for (int64_t bm : {16, 32, 64})
        {
            worstPadded = std::max(worstPadded, maxPadded(T * KM, E, bm));
            worstBlocks = std::max(worstBlocks, maxBlocks(T * KM, E, bm));
        }
        size_t const expected[] = {size_t(T * K * 4), size_t(T * K * 4), size_t(T * 3 * C * 2), size_t(E * 4),
            size_t(worstPadded * 4), size_t(worstBlocks * 4), 4, size_t(T * KM * I * 2), size_t(T * KM * H * 2)};
        size_t offset = 0;
        for (int32_t i = 0; i < ws.count; ++i)
        {
            CHECK_EQ(ws.bytes[i], expected[i]);
            CHECK_EQ(ws.offset[i], offset);
            CHECK_EQ(ws.offset[i] % kWorkspaceAlignment, size_t{0});
            offset = (offset + expected[i] + 255) / 256 * 256;
        }
        CHECK_EQ(ws.total, offset);
        CHECK_EQ(workspaceBytes(lib, req, &error), ws.total);
    }
}

TEST_CASE(workspace_monotone)
{
    // Any T <= T_max must fit in the workspace sized for T_max (enqueue relies on it).
    KernelSetDesc const& set = ceLibrary().set(0);
    size_t previous = 0;
    for (int64_t T = 0; T <= 5000; T += (T < 300 ? 1 : 37))
    {
        WorkspaceLayout ws;
        std::string error;
        CHECK(computeWorkspace(set, LayerDims{T, 2048, 1024, 8, 2048}, 4, 2, DType::kBF16, ws, &error));
        CHECK(ws.total >= previous);
        previous = ws.total;
    }
    // A plain MoE (C = 0) has an empty theta buffer.
    WorkspaceLayout ws;
    std::string error;
    CHECK(computeWorkspace(sparseMixerLibrary().set(0), LayerDims{10, 128, 64, 8, 0}, 2, 2, DType::kFP16, ws, &error));
    CHECK_EQ(ws.bytes[2], size_t{0});
    CHECK(!computeWorkspace(set, LayerDims{-1, 2048, 1024, 8, 2048}, 4, 2, DType::kBF16, ws, &error));
}

TEST_CASE(manifest_fixture_sparsemixer)
{
    KernelLibrary const& lib = sparseMixerLibrary();
    CHECK_CONTAINS(lib.describe(), "sparsemixer top_k=2 n_ce=0 jitter_eps=0.01 E={8,16} dtypes={fp16} sm={90}");
    MoeAttrs attrs;
    attrs.routing = Routing::kSparseMixer;
    attrs.topK = 2;
    attrs.jitterEps = 0.01f;
    CHECK_EQ(lib.findSet(attrs, 16), 0);
    PlanRequest req
        = planRequest(Variant::kSparseMixer, attrs, DType::kFP16, DType::kFP16, LayerDims{64, 128, 64, 16, 0}, 90);
    LaunchPlan plan;
    std::string error;
    CHECK(buildLaunchPlan(lib, req, plan, &error));
    CHECK_EQ(plan.numLaunches, 6); // no theta kernel
    CHECK_EQ(stemOf(lib, plan, 0), std::string("sparsemixer_top2_fp16_e16"));
    KernelLaunch const& gate = plan.launches[3];
    CHECK_EQ(gate.args[1].buffer, static_cast<int32_t>(kBufHidden)); // theta_ptr -> hidden, never read
    CHECK_EQ(gate.args[argIndex(lib, plan, 3, "stride_theta_t")].value, 0);
    CHECK_EQ(gate.args[argIndex(lib, plan, 3, "stride_theta_r")].value, 0);
    for (int32_t i = 0; i < plan.numLaunches; ++i)
    {
        for (int32_t a = 0; a < plan.launches[i].numArgs; ++a)
        {
            CHECK(plan.launches[i].args[a].buffer != static_cast<int32_t>(kBufCes));
        }
    }
    // A different band was compiled into the kernel: refused.
    req.attrs.jitterEps = 0.02f;
    CHECK(!buildLaunchPlan(lib, req, plan, &error));
    CHECK_CONTAINS(error, "SparseMixerMoE(top_k=2, n_ce=0, jitter_eps=0.02) E=16: no AOT kernels compiled for it");
    // A softmax op with the same top_k does not take SparseMixer kernels.
    req.attrs = attrs;
    req.attrs.routing = Routing::kSoftmaxTopK;
    req.variant = Variant::kPlain;
    CHECK(!buildLaunchPlan(lib, req, plan, &error));
    // sm_80 is not in this manifest.
    req.variant = Variant::kSparseMixer;
    req.attrs = attrs;
    req.arch = 80;
    CHECK(!buildLaunchPlan(lib, req, plan, &error));
    CHECK_CONTAINS(error, "no kernel image for sm_80");
}

TEST_CASE(manifest_fixture_scaled)
{
    KernelLibrary const& lib = scaledLibrary();
    MoeAttrs attrs;
    attrs.topK = 2;
    attrs.normTopkProb = 1;
    attrs.routingScale = 2.5f;
    CHECK_EQ(lib.findSet(attrs, 8), 0);
    attrs.routingScale = 1.0f;
    CHECK_EQ(lib.findSet(attrs, 8), -1);
    attrs.routingScale = 2.5f;
    attrs.normTopkProb = 0;
    CHECK_EQ(lib.findSet(attrs, 8), -1);
    attrs.normTopkProb = 1;
    PlanRequest req
        = planRequest(Variant::kPlain, attrs, DType::kFP16, DType::kFP16, LayerDims{3, 256, 128, 8, 0}, 90);
    LaunchPlan plan;
    std::string error;
    CHECK(buildLaunchPlan(lib, req, plan, &error));
    CHECK_EQ(stemOf(lib, plan, 0), std::string("topk_softmax_fp16_e8"));
    CHECK_EQ(plan.numLaunches, 6);
}

TEST_CASE(manifest_fixture_sigmoid)
{
    KernelLibrary const& lib = sigmoidLibrary();
    CHECK_CONTAINS(lib.describe(),
        "sigmoid_topk top_k=4 n_ce=2 norm_topk_prob=1 routing_scale=2.5 n_group=4 topk_group=2 E={16} dtypes={bf16} sm={90}");
    MoeAttrs const attrs = sigmoidAttrs();
    CHECK(sameLayer(lib.set(0).layer(), attrs));
    CHECK_EQ(lib.findSet(attrs, 16), 0);
    // The groups are compiled into the routing kernel: a layer with others needs its own set.
    MoeAttrs other = attrs;
    other.nGroup = 8;
    CHECK(!sameLayer(lib.set(0).layer(), other));
    CHECK_EQ(lib.findSet(other, 16), -1);
    other = attrs;
    other.topkGroup = 3;
    CHECK_EQ(lib.findSet(other, 16), -1);
    other = attrs;
    other.routingScale = 1.0f;
    CHECK_EQ(lib.findSet(other, 16), -1);

    // DeepSeek-V3's engines: bf16 activations, fp32 router logits (its router runs in fp32).
    PlanRequest req
        = planRequest(Variant::kCompressedSigmoid, attrs, DType::kBF16, DType::kFP32, LayerDims{40, 128, 64, 16, 128}, 90);
    LaunchPlan plan;
    std::string error;
    bool const ok = buildLaunchPlan(lib, req, plan, &error);
    CHECK(ok);
    if (!ok)
    {
        std::cerr << error << "\n";
    }
    int64_t const T = 40;
    int64_t const E = 16;
    CHECK_EQ(plan.numLaunches, 7);
    CHECK_EQ(stemOf(lib, plan, 0), std::string("sigmoid_topk_bf16_e16_logits_fp32"));
    CHECK_EQ(stemOf(lib, plan, 1), std::string("mix_compressed_experts_bf16"));
    CHECK_EQ(stemOf(lib, plan, 2), std::string("count_pairs_per_expert_e16"));
    CHECK_EQ(stemOf(lib, plan, 6), std::string("sum_main_slots_bf16"));
    KernelLaunch const& route = plan.launches[0];
    CHECK_EQ(route.grid[0], static_cast<uint32_t>(cdiv(T, 16)));
    CHECK_EQ(route.numArgs, 7 + 2);
    CHECK_EQ(route.args[0].buffer, static_cast<int32_t>(kBufRouterLogits));
    CHECK_EQ(route.args[1].buffer, static_cast<int32_t>(kBufScoreBias));
    CHECK(route.args[1].aligned16);
    CHECK_EQ(route.args[2].buffer, kNumIoBuffers + 0); // routing_weights
    CHECK_EQ(route.args[3].buffer, kNumIoBuffers + 1); // expert_ids
    CHECK_EQ(route.args[4].value, T);
    CHECK_EQ(route.args[5].value, E);
    CHECK_EQ(route.args[6].value, E);
    CHECK_EQ(plan.launches[1].args[2].buffer, static_cast<int32_t>(kBufCes));
    // bf16 router logits: the plan's own routing kernel.
    req.logits = DType::kBF16;
    CHECK(buildLaunchPlan(lib, req, plan, &error));
    CHECK_EQ(stemOf(lib, plan, 0), std::string("sigmoid_topk_bf16_e16"));

    // enqueue's buffer bases: each input at inputBuffer(), so score_bias (input 5) is what the
    // routing kernel's score_bias_ptr resolves to, ces (input 4) what theta's ces_ptr does.
    uint64_t bases[kMaxBuffers] = {};
    for (int32_t i = 0; i < numInputs(req.variant); ++i)
    {
        bases[inputBuffer(req.variant, i)] = 0x100000 * static_cast<uint64_t>(i + 1);
    }
    uint64_t address = 0;
    CHECK(resolvePointer(plan.launches[0].args[1], bases, address));
    CHECK_EQ(address, uint64_t{0x600000});
    CHECK(resolvePointer(plan.launches[1].args[2], bases, address));
    CHECK_EQ(address, uint64_t{0x500000});

    // E must split into the compiled groups (checked before looking for kernels).
    req.dims.E = 18;
    CHECK(!buildLaunchPlan(lib, req, plan, &error));
    CHECK_CONTAINS(error, "18 experts do not split into n_group=4 equal groups");
    // The kernels read ces and score_bias: a SigmoidMoE (no ces) or a softmax op cannot take them.
    req = PlanRequest{};
    req.variant = Variant::kCompressed;
    req.attrs = attrs;
    req.activation = DType::kBF16;
    req.logits = DType::kBF16;
    req.dims = LayerDims{40, 128, 64, 16, 128};
    req.arch = 90;
    CHECK(!buildLaunchPlan(lib, req, plan, &error));
    CHECK_CONTAINS(error, "does not match the op type");
    req.attrs.routing = Routing::kSoftmaxTopK;
    req.attrs.nGroup = 1;
    req.attrs.topkGroup = 1;
    CHECK(!buildLaunchPlan(lib, req, plan, &error));
    CHECK_CONTAINS(error, "no AOT kernels compiled for it");
    // Every tile entry builds (the fallback included) and the workspace is the CE layout.
    req.variant = Variant::kCompressedSigmoid;
    req.attrs = attrs;
    for (int64_t tokens : {1, 32, 33, 256, 257, 1024, 1025, 8192})
    {
        req.dims.T = tokens;
        CHECK(buildLaunchPlan(lib, req, plan, &error));
        CHECK_EQ(plan.numLaunches, 7);
        CHECK_EQ(plan.workspace.bytes[2], size_t(tokens * 3 * 128 * 2)); // theta
    }
    std::vector<int32_t> const archs = {90};
    CHECK(checkTokenRange(lib, req, 1, 4096, archs, &error));
}

TEST_CASE(manifest_fixture_clamped)
{
    KernelLibrary const& lib = clampedLibrary();
    CHECK_CONTAINS(lib.describe(), "softmax_topk top_k=4 n_ce=2 norm_topk_prob=1 routing_scale=1 clamped_swiglu "
                                   "swiglu_alpha=1.702 swiglu_limit=7 E={8} dtypes={bf16} sm={90}");
    MoeAttrs const attrs = clampedAttrs();
    CHECK(sameLayer(lib.set(0).layer(), attrs));
    CHECK_EQ(lib.findSet(attrs, 8), 0);
    // The activation and its constants are compiled into the gate/up GEMM: other values need their
    // own set, and so does a CompressedMoE layer with the same routing (its kernels read no biases).
    MoeAttrs other = attrs;
    other.swigluLimit = 6.0f;
    CHECK(!sameLayer(lib.set(0).layer(), other));
    CHECK_EQ(lib.findSet(other, 8), -1);
    other = attrs;
    other.swigluAlpha = 1.0f;
    CHECK_EQ(lib.findSet(other, 8), -1);
    MoeAttrs unclamped = attrs;
    unclamped.activation = Activation::kSwiGLU;
    unclamped.swigluAlpha = 1.0f;
    unclamped.swigluLimit = 0.0f;
    CHECK_EQ(lib.findSet(unclamped, 8), -1);
    // Nor does a SwiGLU set of the same routing (the CE fixture's: not renormalised) run gpt-oss's experts.
    MoeAttrs ceRouting = attrs;
    ceRouting.normTopkProb = 0;
    CHECK_EQ(ceLibrary().findSet(ceRouting, 8), -1);
    ceRouting.activation = Activation::kSwiGLU;
    ceRouting.swigluAlpha = 1.0f;
    ceRouting.swigluLimit = 0.0f;
    CHECK_EQ(ceLibrary().findSet(ceRouting, 8), 0);
    LaunchPlan plan;
    std::string error;
    PlanRequest req = planRequest(Variant::kCompressed, unclamped, DType::kBF16, DType::kBF16,
        LayerDims{40, 128, 64, 8, 128}, 90);
    CHECK(!buildLaunchPlan(lib, req, plan, &error));
    CHECK_CONTAINS(error, "no AOT kernels compiled for it");

    // gpt-oss's engines: bf16 activations and router logits (its router runs in the model's dtype).
    req = planRequest(Variant::kCompressedClamped, attrs, DType::kBF16, DType::kBF16, LayerDims{40, 128, 64, 8, 128}, 90);
    bool const ok = buildLaunchPlan(lib, req, plan, &error);
    CHECK(ok);
    if (!ok)
    {
        std::cerr << error << "\n";
    }
    CHECK_EQ(plan.numLaunches, 7);
    CHECK_EQ(stemOf(lib, plan, 0), std::string("topk_softmax_bf16_e8"));
    CHECK_EQ(stemOf(lib, plan, 1), std::string("mix_compressed_experts_bf16"));
    CHECK_EQ(stemOf(lib, plan, 4), std::string("gate_up_swiglu_bf16_ce_clamped_bm16_bn64_bk128_w4_s3_g4_swap"));
    CHECK_EQ(stemOf(lib, plan, 5), std::string("down_weighted_bf16_bias_bm16_bn128_bk64_w4_s4_g4_swap"));
    CHECK_EQ(stemOf(lib, plan, 6), std::string("sum_main_slots_bf16"));
    int32_t const gateUpBias = argIndex(lib, plan, 4, "gate_up_bias_ptr");
    int32_t const downBias = argIndex(lib, plan, 5, "down_bias_ptr");
    CHECK(gateUpBias >= 0 && downBias >= 0);
    if (gateUpBias < 0 || downBias < 0)
    {
        return;
    }
    KernelLaunch const& gateUp = plan.launches[4];
    KernelLaunch const& down = plan.launches[5];
    CHECK_EQ(gateUp.args[gateUpBias].buffer, static_cast<int32_t>(kBufGateUpBias));
    CHECK(gateUp.args[gateUpBias].aligned16);
    CHECK_EQ(gateUp.args[gateUpBias].value, int64_t{0});
    CHECK_EQ(down.args[downBias].buffer, static_cast<int32_t>(kBufDownBias));
    CHECK(down.args[downBias].aligned16);
    CHECK_EQ(gateUp.args[argIndex(lib, plan, 4, "gate_up_ptr")].buffer, static_cast<int32_t>(kBufGateUp));
    CHECK_EQ(down.args[argIndex(lib, plan, 5, "down_ptr")].buffer, static_cast<int32_t>(kBufDown));

    // enqueue's buffer bases: each input at inputBuffer(), so gate_up_bias (input 5) is what the
    // gate/up GEMM's bias pointer resolves to, down_bias (input 6) the down GEMM's, ces (input 4) theta's.
    uint64_t bases[kMaxBuffers] = {};
    for (int32_t i = 0; i < numInputs(req.variant); ++i)
    {
        bases[inputBuffer(req.variant, i)] = 0x100000 * static_cast<uint64_t>(i + 1);
    }
    uint64_t address = 0;
    CHECK(resolvePointer(gateUp.args[gateUpBias], bases, address));
    CHECK_EQ(address, uint64_t{0x600000});
    CHECK(resolvePointer(down.args[downBias], bases, address));
    CHECK_EQ(address, uint64_t{0x700000});
    CHECK(resolvePointer(plan.launches[1].args[argIndex(lib, plan, 1, "ces_ptr")], bases, address));
    CHECK_EQ(address, uint64_t{0x500000});
    bases[kBufDownBias] = 0x700008; // a bias the kernel assumes 16-byte aligned
    CHECK(!resolvePointer(down.args[downBias], bases, address));

    // fp32 router logits: the routing kernel's twin; the GEMMs are the same.
    req.logits = DType::kFP32;
    CHECK(buildLaunchPlan(lib, req, plan, &error));
    CHECK_EQ(stemOf(lib, plan, 0), std::string("topk_softmax_bf16_e8_logits_fp32"));
    // Every tile entry builds (the fallback included), each GEMM reading its bias.
    for (int64_t tokens : {1, 32, 33, 256, 257, 1024, 1025, 8192})
    {
        req.dims.T = tokens;
        CHECK(buildLaunchPlan(lib, req, plan, &error));
        CHECK_EQ(plan.numLaunches, 7);
        CHECK_CONTAINS(stemOf(lib, plan, 4), "_clamped_");
        CHECK_EQ(plan.launches[5].args[argIndex(lib, plan, 5, "down_bias_ptr")].buffer,
            static_cast<int32_t>(kBufDownBias));
        CHECK_EQ(plan.workspace.bytes[2], size_t(tokens * 3 * 128 * 2)); // theta
    }
    std::vector<int32_t> const archs = {90};
    CHECK(checkTokenRange(lib, req, 1, 4096, archs, &error));
    // The GEMMs read gate_up_bias / down_bias: an op type without them cannot plan with this set (its
    // attributes cannot name it: the activation comes from the op type).
    req.variant = Variant::kCompressedSigmoid;
    req.attrs.routing = Routing::kSigmoidTopK;
    CHECK(!buildLaunchPlan(lib, req, plan, &error));
    CHECK_CONTAINS(error, "activation clamped_swiglu does not match the op type");
    // H not a multiple of 16 (gpt-oss's 2880 is): the GEMMs' divisible_by_16 arguments refuse it.
    req = planRequest(Variant::kCompressedClamped, attrs, DType::kBF16, DType::kBF16, LayerDims{40, 2888, 2880, 8, 2888}, 90);
    CHECK(!buildLaunchPlan(lib, req, plan, &error));
    CHECK_CONTAINS(error, "multiple of 16");
    req.dims = LayerDims{40, 2880, 2880, 8, 2880};
    CHECK(buildLaunchPlan(lib, req, plan, &error));
}

TEST_CASE(plan_errors)
{
    KernelLibrary const& lib = ceLibrary();
    LaunchPlan plan;
    std::string error;
    PlanRequest req = ceRequest(16);
    req.dims.E = 16;
    CHECK(!buildLaunchPlan(lib, req, plan, &error));
    CHECK_CONTAINS(error, "no AOT kernels compiled for it");
    CHECK_CONTAINS(error, "E={8}");
    req = ceRequest(16, 90, DType::kFP32);
    CHECK(!buildLaunchPlan(lib, req, plan, &error));
    CHECK_CONTAINS(error, "no AOT kernels for activations fp32");
    // fp32 router logits with bf16 activations: the routing kernel's fp32-logits twin.
    req = ceRequest(16);
    req.logits = DType::kFP32;
    CHECK(buildLaunchPlan(lib, req, plan, &error));
    CHECK_EQ(stemOf(lib, plan, 0), std::string("topk_softmax_bf16_e8_logits_fp32"));
    // The SparseMixer fixture (fp16 only) has no twin compiled: refused, and said so.
    MoeAttrs band;
    band.routing = Routing::kSparseMixer;
    band.topK = 2;
    band.jitterEps = 0.01f;
    PlanRequest const sparse
        = planRequest(Variant::kSparseMixer, band, DType::kFP16, DType::kBF16, LayerDims{16, 128, 64, 8, 0}, 90);
    CHECK(!buildLaunchPlan(sparseMixerLibrary(), sparse, plan, &error));
    CHECK_CONTAINS(error, "no routing kernel for bf16 router logits like sparsemixer_top2_fp16_e8");
    req = ceRequest(16, 75);
    CHECK(!buildLaunchPlan(lib, req, plan, &error));
    req = ceRequest(16);
    req.attrs.nCe = 4;
    CHECK(!buildLaunchPlan(lib, req, plan, &error));
    // H not a multiple of 16: the kernels' divisible_by_16 arguments refuse it.
    req = ceRequest(16);
    req.dims.H = 120;
    CHECK(!buildLaunchPlan(lib, req, plan, &error));
    CHECK_CONTAINS(error, "multiple of 16");
    // sm_86 / sm_89 run the sm_80 cubins but allow 99 KiB of shared memory per block: the prefill
    // GEMM (112 KiB on sm_80) does not fit; decode tiles do.
    req = ceRequest(5000, 80);
    req.maxSharedBytes = 101376;
    CHECK(!buildLaunchPlan(lib, req, plan, &error));
    CHECK_CONTAINS(error, "shared memory");
    req = ceRequest(8, 80);
    req.maxSharedBytes = 101376;
    CHECK(buildLaunchPlan(lib, req, plan, &error));
    // 32-bit arguments: T * KM beyond int32 is refused.
    req = ceRequest(int64_t{1} << 31);
    CHECK(!buildLaunchPlan(lib, req, plan, &error));
    CHECK_CONTAINS(error, "does not fit i32");
    // Unknown shapes.
    req = ceRequest(-1);
    CHECK(!buildLaunchPlan(lib, req, plan, &error));
}

TEST_CASE(plan_zero_tokens)
{
    LaunchPlan plan;
    std::string error;
    CHECK(buildLaunchPlan(ceLibrary(), ceRequest(0), plan, &error));
    CHECK_EQ(plan.numLaunches, 0);
}

TEST_CASE(synthetic_manifest)
{
    KernelLibrary const& lib = syntheticLibrary();
    MoeAttrs attrs;
    attrs.topK = 2;
    attrs.nCe = 1;
    attrs.normTopkProb = 1;
    PlanRequest req
        = planRequest(Variant::kCompressed, attrs, DType::kBF16, DType::kFP32, LayerDims{20, 16, 16, 4, 16}, 80);
    LaunchPlan plan;
    std::string error;
    CHECK(buildLaunchPlan(lib, req, plan, &error));
    CHECK_EQ(plan.numLaunches, 2);
    CHECK_EQ(stemOf(lib, plan, 0), std::string("route_fp32")); // fp32 logits: the variant
    CHECK_EQ(stemOf(lib, plan, 1), std::string("work_bm16"));
    KernelLaunch const& work = plan.launches[1];
    int64_t const padded = 20 + 4 * 15;
    CHECK_EQ(work.grid[0], static_cast<uint32_t>(cdiv(padded, 16)));
    CHECK_EQ(work.grid[1], 16u);
    CHECK_EQ(work.block, 64u);
    CHECK_EQ(work.shared, 70000u);
    CHECK_EQ(work.numArgs, 4 + 1);
    CHECK_EQ(work.args[0].buffer, kNumIoBuffers + 1);
    CHECK_EQ(work.args[0].value, 4); // ids + KM: one int32
    CHECK(work.args[2].kind == ArgKind::kU32);
    CHECK_EQ(work.args[2].value, padded);
    CHECK_EQ(work.args[3].value, 16 * 1024 * 1024);
    // Workspace "scratch" [padded, H] with the worst BLOCK_M (16).
    CHECK_EQ(plan.workspace.bytes[2], size_t(padded * 16 * 2));
    // Small T picks the BLOCK_M = 4 plan.
    req.dims.T = 8;
    CHECK(buildLaunchPlan(lib, req, plan, &error));
    CHECK_EQ(stemOf(lib, plan, 1), std::string("work_bm4"));
    // Logits of the activation type use the plan's own routing kernel.
    req.logits = DType::kBF16;
    CHECK(buildLaunchPlan(lib, req, plan, &error));
    CHECK_EQ(stemOf(lib, plan, 0), std::string("route_bf16"));
    // C = 0 gives an empty grid: that launch is skipped, like Triton's launcher does.
    req.dims.C = 0;
    CHECK(buildLaunchPlan(lib, req, plan, &error));
    CHECK_EQ(plan.numLaunches, 1);
    // H * 2^20 beyond int32.
    req.dims.C = 16;
    req.dims.H = 4096;
    CHECK(!buildLaunchPlan(lib, req, plan, &error));
    CHECK_CONTAINS(error, "does not fit i32");
    CHECK(lib.hasLogitsType(0, DType::kBF16, DType::kFP32));
    CHECK(!lib.hasLogitsType(0, DType::kFP16, DType::kFP16));
}

TEST_CASE(several_sets)
{
    KernelLibrary const empty;
    CHECK(empty.empty());
    CHECK_EQ(empty.describe(), std::string("no kernels embedded"));
    // Two sets: each layer finds its own.
    KernelLibrary const lib({&fixtures::ce::kKernelSet, &fixtures::sparsemixer::kKernelSet});
    MoeAttrs plain;
    plain.routing = Routing::kSparseMixer;
    plain.topK = 2;
    plain.jitterEps = 0.01f;
    MoeAttrs ce;
    ce.topK = 4;
    ce.nCe = 2;
    CHECK_EQ(lib.findSet(plain, 8), 1);
    CHECK_EQ(lib.findSet(ce, 8), 0);
    CHECK(lib.setsFor(plain) == std::vector<int32_t>({1}));
    CHECK(lib.setsFor(ce) == std::vector<int32_t>({0}));
    CHECK(lib.archs() == std::vector<int32_t>({80, 90}));
    ce.topK = 5;
    CHECK(lib.setsFor(ce).empty());
    // A softmax layer with the sigmoid set's top_k, n_ce and constants does not take its kernels.
    KernelLibrary const mixed({&fixtures::ce::kKernelSet, &fixtures::sigmoid::kKernelSet});
    MoeAttrs softmax = sigmoidAttrs();
    softmax.routing = Routing::kSoftmaxTopK;
    softmax.nGroup = 1;
    softmax.topkGroup = 1;
    CHECK_EQ(mixed.findSet(softmax, 16), -1);
    CHECK_EQ(mixed.findSet(sigmoidAttrs(), 16), 1);
    CHECK_EQ(mixed.findSet(sigmoidAttrs(), 8), -1);
}

TEST_CASE(resolve_pointers)
{
    uint64_t bases[kMaxBuffers] = {};
    bases[kBufHidden] = 0x10000;
    bases[kNumIoBuffers + 0] = 0x20000;
    uint64_t address = 1;
    CHECK(resolvePointer(LaunchArg{ArgKind::kPointer, -1, 0, false}, bases, address));
    CHECK_EQ(address, uint64_t{0});
    CHECK(resolvePointer(LaunchArg{ArgKind::kPointer, kBufHidden, 32, true}, bases, address));
    CHECK_EQ(address, uint64_t{0x10020});
    CHECK(!resolvePointer(LaunchArg{ArgKind::kPointer, kBufHidden, 8, true}, bases, address)); // misaligned
    CHECK(resolvePointer(LaunchArg{ArgKind::kPointer, kNumIoBuffers, 8, false}, bases, address));
    CHECK_EQ(address, uint64_t{0x20008});
    CHECK(!resolvePointer(LaunchArg{ArgKind::kPointer, kBufCes, 0, false}, bases, address)); // not bound
    CHECK(!resolvePointer(LaunchArg{ArgKind::kPointer, kMaxBuffers, 0, false}, bases, address));
}

TEST_CASE(no_allocation_in_plan)
{
    KernelLibrary const& lib = ceLibrary();
    static LaunchPlan plan; // static: keep the 16 KiB plan off the small-stack question entirely
    std::string error;
    PlanRequest const req = ceRequest(300);
    CHECK(buildLaunchPlan(lib, req, plan, &error)); // warm-up
    long const before = allocationCount();
    bool ok = true;
    for (int64_t T : {1, 7, 32, 33, 300, 1024, 4096})
    {
        ok = buildLaunchPlan(lib, ceRequest(T), plan, nullptr) && ok;
    }
    long const after = allocationCount();
    CHECK(ok);
    CHECK_EQ(after - before, 0L);
}

// ------------------------------------------------------------------------------------------------
// Fuzzing: what TensorRT or a manifest hands the plugin, random and out of range. Each case draws
// from a fixed seed (CE_TRT_FUZZ_SEED overrides it), so a failure reproduces; CE_TRT_FUZZ_SCALE
// multiplies the iterations. Built with CE_TRT_SANITIZE=ON (what the Python test does when the
// compiler can), AddressSanitizer and UBSan also catch any out-of-bounds read or undefined
// arithmetic on the way, not only crashes.

uint64_t fuzzSeed()
{
    char const* text = std::getenv("CE_TRT_FUZZ_SEED");
    return text != nullptr ? std::strtoull(text, nullptr, 10) : 20261205u;
}

int64_t fuzzIterations(int64_t base)
{
    char const* text = std::getenv("CE_TRT_FUZZ_SCALE");
    double const scale = text != nullptr ? std::atof(text) : 1.0;
    return std::max<int64_t>(1, static_cast<int64_t>(static_cast<double>(base) * scale));
}

class Fuzz
{
public:
    explicit Fuzz(uint64_t salt)
        : mRng(fuzzSeed() ^ (salt * 0x9E3779B97F4A7C15ull))
    {
    }

    uint64_t bits() { return mRng(); }
    int64_t range(int64_t lo, int64_t hi) { return lo + static_cast<int64_t>(mRng() % static_cast<uint64_t>(hi - lo + 1)); }
    bool chance(int percent) { return range(0, 99) < percent; }
    template <typename T>
    T const& pick(std::vector<T> const& values) { return values[static_cast<size_t>(range(0, static_cast<int64_t>(values.size()) - 1))]; }

    //! Small, boundary and enormous integers, negative ones included.
    int64_t extent()
    {
        static std::vector<int64_t> const special = {-1, 0, 1, 2, 15, 16, 17, 32, 64, 128, 1000, 2048, 4096, 65535, 65536,
            INT32_MAX, int64_t{INT32_MAX} + 1, int64_t{1} << 40, int64_t{1} << 62, INT64_MAX, INT64_MIN, -16};
        return chance(50) ? pick(special) : (chance(50) ? range(-4, 300) * (chance(50) ? 16 : 1) : static_cast<int64_t>(bits()));
    }

    std::string bytes(size_t maxLength)
    {
        std::string out(static_cast<size_t>(range(0, static_cast<int64_t>(maxLength))), '\0');
        for (char& c : out)
        {
            c = static_cast<char>(bits() & 0xFF);
        }
        return out;
    }

private:
    std::mt19937_64 mRng;
};

size_t fieldTypeSize(FieldType t)
{
    switch (t)
    {
    case FieldType::kINT32: return 4;
    case FieldType::kINT64: return 8;
    case FieldType::kFLOAT32: return 4;
    case FieldType::kFLOAT64: return 8;
    default: return 1;
    }
}

TEST_CASE(fuzz_fields)
{
    // createPlugin's input: TensorRT's PluginFieldCollection, from an ONNX node's attributes or a
    // deserialized engine. Names, types (also outside the enum), lengths and bytes are random; each
    // value buffer holds exactly length x element size bytes, as TensorRT's contract has it, so a
    // read past it is an ASan error.
    Fuzz fuzz(1);
    std::vector<char const*> const names = {"top_k", "n_ce", "norm_topk_prob", "routing_scale", "jitter_eps", "max_tokens",
        "n_group", "topk_group", "swiglu_alpha", "swiglu_limit", "plugin_namespace", "plugin_version", "", "top_k_",
        "TOP_K", nullptr};
    int64_t accepted = 0;
    int64_t const iterations = fuzzIterations(100000);
    for (int64_t i = 0; i < iterations; ++i)
    {
        Variant const v = kAllVariants[fuzz.range(0, kNumVariants - 1)];
        int32_t const count = static_cast<int32_t>(fuzz.range(0, 8));
        std::vector<FieldView> fields(static_cast<size_t>(count));
        std::vector<std::vector<unsigned char>> storage(static_cast<size_t>(count));
        for (int32_t f = 0; f < count; ++f)
        {
            FieldView& field = fields[static_cast<size_t>(f)];
            field.name = fuzz.pick(names);
            field.type = static_cast<FieldType>(fuzz.chance(90) ? fuzz.range(0, 4) : fuzz.range(-3, 40));
            field.length = static_cast<int32_t>(fuzz.chance(80) ? 1 : fuzz.range(-2, 4));
            if (field.length > 0 && fuzz.chance(95))
            {
                auto& bytes = storage[static_cast<size_t>(f)];
                bytes.resize(static_cast<size_t>(field.length) * fieldTypeSize(field.type));
                if (fuzz.chance(50))
                {
                    for (auto& b : bytes)
                    {
                        b = static_cast<unsigned char>(fuzz.bits());
                    }
                }
                else // a plausible value of the field's type
                {
                    int64_t const value = fuzz.chance(70) ? fuzz.range(-2, 10) : fuzz.extent();
                    if (field.type == FieldType::kINT32)
                    {
                        int32_t const narrow = static_cast<int32_t>(value);
                        std::memcpy(bytes.data(), &narrow, 4);
                    }
                    else if (field.type == FieldType::kINT64)
                    {
                        std::memcpy(bytes.data(), &value, 8);
                    }
                    else if (field.type == FieldType::kFLOAT32)
                    {
                        float const x = static_cast<float>(value) / 100.0f;
                        std::memcpy(bytes.data(), &x, 4);
                    }
                }
                field.data = bytes.data();
            }
        }
        MoeAttrs attrs;
        std::string error;
        if (!parseFields(v, fields.data(), count, attrs, &error))
        {
            CHECK(!error.empty());
            continue;
        }
        ++accepted;
        // Whatever was accepted is valid, and survives the serialization round trip unchanged.
        CHECK(validateAttrs(v, attrs, &error));
        SerializedFields serialized;
        serialized.fill(v, attrs);
        MoeAttrs again;
        CHECK(parseFields(v, serialized.fields(), serialized.count(), again, &error));
        CHECK(again == attrs);
    }
    std::cout << "  fuzz_fields: " << iterations << " field sets, " << accepted << " accepted\n";
    CHECK(accepted > 0);
}

TEST_CASE(fuzz_shapes)
{
    // getOutputShapes / configurePlugin / supportsFormatCombination inputs: ranks and extents of
    // every kind, unknown (-1) ones included.
    Fuzz fuzz(4);
    int64_t accepted = 0;
    int64_t acceptedClamped = 0;
    int64_t const iterations = fuzzIterations(100000);
    for (int64_t i = 0; i < iterations; ++i)
    {
        Variant const v = kAllVariants[fuzz.range(0, kNumVariants - 1)];
        int32_t const nbInputs = static_cast<int32_t>(fuzz.chance(90) ? numInputs(v) : fuzz.range(0, kMaxInputs));
        std::array<Shape, kMaxInputs> shapes{};
        LayerDims consistent{fuzz.range(0, 64), fuzz.range(1, 8) * 16, fuzz.range(1, 8) * 16, fuzz.range(1, 16), 0};
        consistent.C = std::max(consistent.H, consistent.I);
        for (int32_t s = 0; s < kMaxInputs; ++s)
        {
            Shape& shape = shapes[static_cast<size_t>(s)];
            if (fuzz.chance(60)) // a consistent layer, then maybe one extent replaced
            {
                if (s == scoreBiasInput(v))
                {
                    shape = Shape::of({consistent.E});
                }
                else if (s == gateUpBiasInput(v))
                {
                    shape = Shape::of({consistent.E, 2 * consistent.I});
                }
                else if (s == downBiasInput(v))
                {
                    shape = Shape::of({consistent.E, consistent.H});
                }
                else
                {
                    switch (s)
                    {
                    case kHidden: shape = Shape::of({consistent.T, consistent.H}); break;
                    case kRouterLogits: shape = Shape::of({consistent.T, consistent.E}); break;
                    case kGateUp: shape = Shape::of({consistent.E, 2 * consistent.I, consistent.H}); break;
                    case kDown: shape = Shape::of({consistent.E, consistent.H, consistent.I}); break;
                    default: shape = Shape::of({consistent.E, 3, consistent.C}); break;
                    }
                }
                if (fuzz.chance(30))
                {
                    shape.d[static_cast<size_t>(fuzz.range(0, shape.rank - 1))] = fuzz.chance(30) ? -1 : fuzz.extent();
                }
            }
            else
            {
                shape.rank = static_cast<int32_t>(fuzz.chance(90) ? fuzz.range(0, kMaxRank) : fuzz.range(-3, kMaxRank + 3));
                for (int32_t d = 0; d < kMaxRank; ++d)
                {
                    shape.d[static_cast<size_t>(d)] = fuzz.chance(20) ? -1 : fuzz.extent();
                }
            }
        }
        LayerDims dims;
        std::string error;
        if (!checkShapes(v, shapes.data(), nbInputs, dims, &error))
        {
            CHECK(!error.empty());
            continue;
        }
        ++accepted;
        // What is accepted is usable: known extents positive (T may be 0), multiples of 16 where the
        // kernels assume it, ces wide enough.
        CHECK(dims.T >= -1 && dims.H != 0 && dims.I != 0 && dims.E != 0);
        for (int64_t extent : {dims.H, dims.I})
        {
            CHECK(extent == -1 || (extent > 0 && extent % 16 == 0));
        }
        if (isCompressed(v) && dims.C >= 0)
        {
            CHECK(dims.C % 16 == 0 && (dims.H < 0 || dims.C >= dims.H) && (dims.I < 0 || dims.C >= dims.I));
        }
        if (scoreBiasInput(v) >= 0)
        {
            Shape const& bias = shapes[static_cast<size_t>(scoreBiasInput(v))];
            CHECK(bias.rank == 1 && (bias.d[0] == -1 || dims.E == bias.d[0]));
        }
        if (activationOf(v) == Activation::kClampedSwiGLU)
        {
            Shape const& gateUpBias = shapes[static_cast<size_t>(gateUpBiasInput(v))];
            Shape const& downBias = shapes[static_cast<size_t>(downBiasInput(v))];
            CHECK(gateUpBias.rank == 2 && (gateUpBias.d[1] == -1 || dims.I * 2 == gateUpBias.d[1]));
            CHECK(downBias.rank == 2 && (downBias.d[1] == -1 || dims.H == downBias.d[1]));
            ++acceptedClamped;
        }
    }
    std::cout << "  fuzz_shapes: " << iterations << " shape sets, " << accepted << " accepted (" << acceptedClamped
              << " of the clamped ops)\n";
    CHECK(accepted > 0);
    CHECK(acceptedClamped > 0);
}

TEST_CASE(example_request_checks)
{
    // examples/run_engine.cpp's checks of a request against the engine's profiles, here with the
    // profiles ce_export builds for --max-batch 4 --max-seq 64 --max-context 128.
    using ce_example::AxisRange;
    auto const range = [](int32_t profile, char const* name, int32_t axis) -> AxisRange {
        std::string const tensor = name;
        if (axis == 0)
        {
            return {1, 4};
        }
        if (tensor == "input_ids")
        {
            return profile == 0 ? AxisRange{1, 64} : AxisRange{1, 1};
        }
        if (tensor == "attention_mask")
        {
            return profile == 0 ? AxisRange{1, 64} : AxisRange{1, 129};
        }
        return profile == 0 ? AxisRange{0, 0} : AxisRange{0, 128}; // the past
    };
    char const* past = "past_key_values.0.key";
    CHECK_EQ(ce_example::checkProfiles(range, past, 1, 4, 16), std::string());
    CHECK_EQ(ce_example::checkProfiles(range, past, 1, 64, 65), std::string()); // the last step's past is 128
    CHECK_EQ(ce_example::checkProfiles(range, past, 1, 64, 0), std::string());
    CHECK_EQ(ce_example::checkProfiles(range, past, 1, 65, 0),
        std::string("prompt length 65 is outside the engine's profile 0 (input_ids axis 1: 1..64); "
                    "rebuild with a larger --max-seq, or shorten --prompt"));
    CHECK_CONTAINS(ce_example::checkProfiles(range, past, 1, 64, 66),
        "decode past (prompt + steps - 1) 64..129 is outside the engine's profile 1 (past_key_values.0.key axis 2: 0..128)");
    // A single profile for both phases (decodeProfile 0) cannot decode here: its past is 0..0.
    CHECK_CONTAINS(ce_example::checkProfiles(range, past, 0, 4, 1), "decode past (prompt + steps - 1) 4 is outside the engine's profile 0");
    CHECK_CONTAINS(ce_example::checkProfiles([](int32_t, char const*, int32_t) { return AxisRange{}; }, past, 1, 1, 1),
        "batch 1 is outside the engine's profile 0 (input_ids axis 0: -1..-1)");
    Fuzz fuzz(6);
    for (int i = 0; i < 2000; ++i) // arbitrary profiles and requests: a message or "", never more
    {
        int64_t const lo = fuzz.extent();
        int64_t const hi = fuzz.extent();
        std::string const message = ce_example::checkProfiles(
            [&](int32_t, char const*, int32_t) { return AxisRange{lo, hi}; }, past, 1, fuzz.range(1, 300), fuzz.range(0, 300));
        CHECK(message.find('\n') == std::string::npos);
    }

    int64_t value = 0;
    CHECK(ce_example::parseInteger("12", value) && value == 12);
    CHECK(ce_example::parseInteger("-3", value) && value == -3);
    for (char const* bad : {"", "12abc", "1,2", " ", "0x10", "99999999999999999999", "1e3"})
    {
        CHECK(!ce_example::parseInteger(bad, value));
    }
}

// The kernel sets linked in as the plugin embeds them (embedded_kernels.cpp, from `python -m
// ce_kernels.aot` output folders; none by default): every entry name is in its cubin, and plans
// build for every dtype, E, architecture and tile entry.
TEST_CASE(aot_contract)
{
    size_t count = 0;
    KernelSetDesc const* const* sets = embedded::kernelSets(&count);
    if (count == 0)
    {
        std::cout << "  (no kernel sets embedded: nothing to check)\n";
        return;
    }
    KernelLibrary const lib(std::vector<KernelSetDesc const*>(sets, sets + count));
    for (int32_t s = 0; s < static_cast<int32_t>(count); ++s)
    {
        KernelSetDesc const& set = lib.set(s);
        int checked = 0;
        for (int32_t k = 0; k < set.numKernels; ++k)
        {
            for (int32_t i = 0; i < set.kernels[k].numImages; ++i)
            {
                KernelImage const& image = set.kernels[k].images[i];
                std::string const bytes(reinterpret_cast<char const*>(image.cubin), image.cubinSize);
                CHECK(bytes.compare(0, 4, "\x7f" "ELF") == 0);
                CHECK(bytes.find(std::string(image.entry) + '\0') != std::string::npos);
                ++checked;
            }
        }
        MoeAttrs const attrs = set.layer();
        Variant variant = Variant::kPlain;
        for (Variant v : kAllVariants)
        {
            variant = routingOf(v) == attrs.routing && activationOf(v) == attrs.activation
                    && isCompressed(v) == (attrs.nCe > 0)
                ? v
                : variant;
        }
        for (int32_t p = 0; p < set.numPlans; ++p)
        {
            for (int32_t a = 0; a < set.numArchs; ++a)
            {
                for (int64_t T : {int64_t{1}, int64_t{17}, int64_t{255}, int64_t{1000}, int64_t{8192}})
                {
                    PlanRequest const req = planRequest(variant, attrs, set.plans[p].dtype, set.plans[p].dtype,
                        LayerDims{T, 2048, 1024, set.plans[p].numExperts, attrs.nCe > 0 ? 2048 : 0}, set.archs[a]);
                    LaunchPlan plan;
                    std::string error;
                    bool const ok = buildLaunchPlan(lib, req, plan, &error);
                    CHECK(ok);
                    if (!ok)
                    {
                        std::cerr << error << "\n";
                    }
                    CHECK_EQ(plan.numLaunches, set.plans[p].numLaunches);
                }
            }
        }
        std::cout << "  " << set.summary << ": " << checked << " cubins hold their entries; " << set.numPlans
                  << " launch plans build\n";
    }
}

} // namespace

int main(int argc, char** argv)
{
    std::vector<std::string> only;
    for (int i = 1; i < argc; ++i)
    {
        std::string const arg = argv[i];
        if (arg == "--no-fixtures")
        {
            gNoFixtures = true;
        }
        else if (arg == "--list")
        {
            for (auto const& c : registry())
            {
                std::cout << c.name << "\n";
            }
            return 0;
        }
        else
        {
            only.push_back(arg);
        }
    }
    int passed = 0;
    int failed = 0;
    for (auto const& c : registry())
    {
        if (!only.empty() && std::find(only.begin(), only.end(), c.name) == only.end())
        {
            continue;
        }
        int const before = gFailures;
        c.body();
        if (gFailures == before)
        {
            ++passed;
            std::cout << "[ OK ] " << c.name << "\n";
        }
        else
        {
            ++failed;
            std::cout << "[FAIL] " << c.name << "\n";
        }
    }
    std::cout << passed << " passed, " << failed << " failed\n";
    return failed == 0 && passed > 0 ? 0 : 1;
}
