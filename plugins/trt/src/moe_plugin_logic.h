// The TensorRT MoE plugin's own logic, in plain C++ (no TensorRT, no CUDA): the names, the fields
// and their serialization, the shape / type / format rules, the workspace layout and the launch
// plan of the ahead-of-time-compiled Triton kernels (plugins/ce_kernels/aot.py manifest).
// moe_plugin.cpp maps TensorRT's types onto these; tests/logic_tests.cpp tests them.
//
// The ops (ce_export/moe_math.py is the math; ce_export/onnx_functions.py the ONNX forms):
//   MoE / SparseMixerMoE(hidden [T, H], router_logits [T, E], gate_up [E, 2I, H], down [E, H, I]) -> [T, H]
//   CompressedMoE / CompressedSparseMixerMoE(..., ces [E, 3, C >= max(H, I)])                   -> [T, H]
//   attributes: see creatorFieldNames().
// hidden and router_logits may also carry several leading dimensions ([B, S, H]); T is their product.
#pragma once

#include "formula.h"

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace ce_trt
{

// ------------------------------------------------------------------------------------------------
// Names

constexpr char kPluginNamespace[] = "ce_export";
constexpr char kPluginVersion[] = "1";

enum class Routing : int32_t
{
    kSoftmaxTopK = 0, //!< softmax over all experts (fp32), top-k, optional renormalisation, times routing_scale
    kSparseMixer = 1, //!< Phi-3.5-MoE's SparseMixer (inference form), top-2
};

//! The four ONNX op types of ce_export (onnx_functions.OPS), one creator each.
enum class Variant : int32_t
{
    kPlain = 0,                 //!< "MoE": 4 inputs; top_k, norm_topk_prob, routing_scale
    kCompressed = 1,            //!< "CompressedMoE": 5 inputs (ces); top_k, n_ce, norm_topk_prob, routing_scale
    kSparseMixer = 2,           //!< "SparseMixerMoE": 4 inputs; jitter_eps (top_k = 2)
    kCompressedSparseMixer = 3, //!< "CompressedSparseMixerMoE": 5 inputs; n_ce, jitter_eps (top_k = 2)
};

constexpr int32_t kNumVariants = 4;
constexpr Variant kAllVariants[kNumVariants]
    = {Variant::kPlain, Variant::kCompressed, Variant::kSparseMixer, Variant::kCompressedSparseMixer};

char const* pluginName(Variant v);
bool isCompressed(Variant v);
Routing routingOf(Variant v);
char const* routingName(Routing r); //!< the manifest's spelling: "softmax_topk", "sparsemixer"
int32_t numInputs(Variant v);
constexpr int32_t kNumOutputs = 1;
struct MoeAttrs;
//! "CompressedMoE(top_k=8, n_ce=4, norm_topk_prob=0, routing_scale=1)", for messages.
std::string describeLayer(Variant v, MoeAttrs const& attrs);

enum InputIndex : int32_t
{
    kHidden = 0,
    kRouterLogits = 1,
    kGateUp = 2,
    kDown = 3,
    kCes = 4,
};

// ------------------------------------------------------------------------------------------------
// Data types

enum class DType : int32_t
{
    kFP32,
    kFP16,
    kBF16,
    kINT32,
    kINT64,
    kOther,
};

size_t dtypeSize(DType t);
//! The manifest's spelling: "fp32", "fp16", "bf16", "i32", "i64".
char const* dtypeName(DType t);
//! Parses "fp32"/"fp16"/"bf16"/"i32"/"i64" (also "*bf16" Triton pointer types, star stripped).
DType parseDType(std::string_view name);
//! fp32, fp16 or bf16: the activation types the kernels are compiled for.
bool isActivationType(DType t);

// ------------------------------------------------------------------------------------------------
// Fields (node attributes) and their serialization

enum class FieldType : int32_t
{
    kINT32,
    kINT64,
    kFLOAT32,
    kFLOAT64,
    kCHAR,
    kOther,
};

//! A TensorRT-free view of nvinfer1::PluginField.
struct FieldView
{
    char const* name{nullptr};
    void const* data{nullptr};
    FieldType type{FieldType::kOther};
    int32_t length{0};
};

struct MoeAttrs
{
    Routing routing{Routing::kSoftmaxTopK}; //!< from the op type, not a field
    int32_t topK{0};
    int32_t nCe{0};
    int32_t normTopkProb{0};
    float routingScale{1.0f}; //!< softmax_topk: weights are multiplied by it (DeepSeek-style)
    float jitterEps{0.0f};    //!< sparsemixer: the band
    //! Largest T configurePlugin saw (serialized; informational, 0 = unknown). Nothing depends on
    //! it: configurePlugin runs per profile, possibly on clones, and the workspace TensorRT hands to
    //! enqueue is getWorkspaceSize() of the profile in use.
    int64_t maxTokens{0};

    bool operator==(MoeAttrs const& o) const
    {
        return routing == o.routing && topK == o.topK && nCe == o.nCe && normTopkProb == o.normTopkProb
            && routingScale == o.routingScale && jitterEps == o.jitterEps && maxTokens == o.maxTokens;
    }
};

constexpr char kFieldTopK[] = "top_k";
constexpr char kFieldNCe[] = "n_ce";
constexpr char kFieldNormTopkProb[] = "norm_topk_prob";
constexpr char kFieldRoutingScale[] = "routing_scale";
constexpr char kFieldJitterEps[] = "jitter_eps";
constexpr char kFieldMaxTokens[] = "max_tokens";

//! The fields a creator advertises (getFieldNames): the op type's ONNX attributes
//!   MoE: top_k, norm_topk_prob, routing_scale        CompressedMoE: top_k, n_ce, norm_topk_prob, routing_scale
//!   SparseMixerMoE: jitter_eps                       CompressedSparseMixerMoE: n_ce, jitter_eps
//! max_tokens is not one (the ONNX parser would warn that the node lacks it); it is accepted when present.
std::vector<FieldView> creatorFieldNames(Variant v);

//! Reads attributes: integers as INT32 (what the ONNX parser gives for INT attributes) or INT64,
//! floats as FLOAT32 (or FLOAT64), length 1. Unknown fields, and jitter_eps on the softmax ops, are
//! ignored. Defaults: n_ce 0, norm_topk_prob 0, routing_scale 1, jitter_eps 0; top_k is required for
//! the softmax ops and is 2 for the SparseMixer ops. On failure returns false with a message.
bool parseFields(Variant v, FieldView const* fields, int32_t count, MoeAttrs& out, std::string* error);

//! Checks the attributes against the op type: top_k >= 1, n_ce in 1..top_k-1 for the compressed
//! ops (0 otherwise), norm_topk_prob in {0, 1}, finite routing_scale, jitter_eps >= 0, and top_k = 2,
//! routing_scale = 1, norm_topk_prob = 0 for SparseMixer.
bool validateAttrs(Variant v, MoeAttrs const& attrs, std::string* error);

//! Storage + views for getFieldsToSerialize. The views point into this object: do not copy it
//! after fill().
class SerializedFields
{
public:
    SerializedFields() = default;
    SerializedFields(SerializedFields const&) = delete;
    SerializedFields& operator=(SerializedFields const&) = delete;

    void fill(Variant v, MoeAttrs const& attrs);
    FieldView const* fields() const { return mViews.data(); }
    int32_t count() const { return mCount; }

private:
    int32_t mTopK{0};
    int32_t mNCe{0};
    int32_t mNorm{0};
    float mScale{1.0f};
    float mEps{0.0f};
    int64_t mMaxTokens{0};
    std::array<FieldView, 6> mViews{};
    int32_t mCount{0};
};

// ------------------------------------------------------------------------------------------------
// Shapes, types, formats

constexpr int32_t kMaxRank = 8;

//! Concrete or partly known dimensions (-1 = unknown).
struct Shape
{
    int32_t rank{0};
    std::array<int64_t, kMaxRank> d{};

    static Shape of(std::initializer_list<int64_t> dims);
};

struct LayerDims
{
    int64_t T{-1}; //!< product of hidden's leading dims
    int64_t H{-1};
    int64_t I{-1};
    int64_t E{-1};
    int64_t C{0}; //!< 0 for a plain MoE
};

//! Checks ranks and every dimension that is known (>= 0), including the kernels' assumptions
//! (H, I, C multiples of 16); fills `dims` (-1 where unknown). T = product of hidden's leading dims.
bool checkShapes(Variant v, Shape const* inputs, int32_t nbInputs, LayerDims& dims, std::string* error);

//! The output has hidden's shape.
Shape outputShape(Shape const& hidden);

//! hidden fp32/fp16/bf16; router_logits fp32 or hidden's type; gate_up, down, ces hidden's type.
bool checkTypes(Variant v, DType const* inputs, int32_t nbInputs, std::string* error);

//! The output has hidden's type.
DType outputType(DType const* inputs, int32_t nbInputs);

struct TensorTypeFormat
{
    DType type{DType::kOther};
    bool linear{false};
};

class KernelLibrary;

//! supportsFormatCombination: every tensor linear; types by checkTypes' rules, restricted to the
//! activation / logits types `library` has kernels for (when it has a kernel set for `attrs`; when
//! it has none, configurePlugin reports that). Only inOut[0..pos] are read.
bool supportsCombination(Variant v, MoeAttrs const& attrs, int32_t pos, TensorTypeFormat const* inOut,
    int32_t nbInputs, int32_t nbOutputs, KernelLibrary const* library);

// ------------------------------------------------------------------------------------------------
// The kernel library (one or more AOT manifests) and the launch plan

//! Buffers a kernel argument can point into. Inputs and the output first, then the workspace.
enum BufferId : int32_t
{
    kBufHidden = 0,
    kBufRouterLogits,
    kBufGateUp,
    kBufDown,
    kBufCes,
    kBufOut,
    kNumIoBuffers,
};

constexpr int32_t kMaxWorkspaceBuffers = 16;
constexpr int32_t kMaxBuffers = kNumIoBuffers + kMaxWorkspaceBuffers;
constexpr int32_t kMaxKernelArgs = 40;
constexpr int32_t kMaxLaunches = 16;
constexpr size_t kWorkspaceAlignment = 256;

enum class ArgKind : uint8_t
{
    kPointer,
    kI32,
    kI64,
    kU32,
    kU64,
};

size_t argKindSize(ArgKind k);

struct KernelArgSpec
{
    std::string name;
    std::string type; //!< Triton type as written ("*bf16", "i32")
    ArgKind kind{ArgKind::kI32};
    DType element{DType::kOther}; //!< pointee type, for pointers
    int32_t buffer{-1};           //!< for pointers
    Formula value;                //!< the integer, or the pointer's offset in elements
    bool divisibleBy16{false};
};

struct KernelSpec
{
    std::string stem;
    int32_t arch{0};
    std::string entry;
    std::string cubin; //!< path inside the AOT folder, e.g. "sm90/x.cubin": the embedded image's key
    std::vector<KernelArgSpec> args;
    std::array<Formula, 3> grid;
    int32_t numWarps{4};
    int32_t shared{0};
    int32_t trailingNullPointers{2}; //!< Triton's global / profile scratch parameters
    std::vector<std::pair<std::string, std::string>> constexprText; //!< for matching variants
};

struct WorkspaceSpec
{
    std::string name;
    std::string dtype; //!< "fp32", "i32", or "model" (the activation type)
    std::vector<Formula> shape;
};

struct PlanSpec
{
    DType dtype{DType::kOther};
    int64_t numExperts{0};
    int64_t maxTokens{0};
    std::vector<std::string> stems;
    //! Per arch of the set (same order as KernelSet::archs): kernel index per stem, -1 if absent.
    std::vector<std::vector<int32_t>> kernels;
};

struct KernelSet
{
    std::string source; //!< where it came from, for messages
    Routing routing{Routing::kSoftmaxTopK};
    int32_t topK{0};
    int32_t nCe{0};
    bool normTopkProb{false};
    double routingScale{1.0}; //!< compiled into the routing kernel (constexpr)
    double jitterEps{0.0};    //!< compiled into the routing kernel (constexpr)
    std::vector<int64_t> numExperts;
    std::vector<int32_t> archs;
    std::vector<int64_t> blockMs; //!< every BLOCK_M of the tile table (workspace sizes use the worst)
    std::vector<KernelSpec> kernels;
    std::vector<PlanSpec> plans; //!< sorted by (dtype, E, max_tokens)
    std::vector<WorkspaceSpec> workspace;
    std::string tritonVersion;
};

class KernelLibrary
{
public:
    //! Adds one manifest (the JSON text of ce_kernels.aot's manifest.json). On failure returns
    //! false and leaves the library unchanged.
    bool addManifest(std::string_view json, std::string const& source, std::string* error);

    std::vector<KernelSet> const& sets() const { return mSets; }
    bool empty() const { return mSets.empty(); }

    //! The first set compiled for these attributes (routing, top_k, n_ce and the routing constants
    //! norm_topk_prob / routing_scale or jitter_eps, compared as the fp32 values the kernels were
    //! compiled with) and, when E >= 0, this expert count; or -1.
    int32_t findSet(MoeAttrs const& attrs, int64_t numExperts) const;
    //! Every set compiled for these attributes (any expert count).
    std::vector<int32_t> setsFor(MoeAttrs const& attrs) const;
    //! Whether the set for `attrs` has kernels for this activation type / these router logits.
    bool hasActivationType(int32_t set, DType act) const;
    bool hasLogitsType(int32_t set, DType act, DType logits) const;
    //! Compute capabilities with images, over all sets.
    std::vector<int32_t> archs() const;
    //! One line describing what is compiled, for error messages.
    std::string describe() const;

    //! The routing kernel of another logits type with the same entry, constexprs and other
    //! arguments as `kernel`, or -1.
    int32_t findLogitsVariant(int32_t set, int32_t kernel, DType logits) const noexcept;

private:
    bool findSetIn(int32_t set, MoeAttrs const& attrs, int64_t numExperts) const;

    std::vector<KernelSet> mSets;
};

//! The image to run on a device of compute capability `cc` (major * 10 + minor): an exact match;
//! else, below 90, the highest arch of the same major <= cc (cubins are forward compatible within a
//! major). Triton compiles 90 and above for the arch-specific targets (sm_90a ...), which run only
//! on exactly that arch. Returns -1 when none fits.
int32_t selectArch(std::vector<int32_t> const& available, int32_t cc);

struct WorkspaceLayout
{
    int32_t count{0};
    std::array<size_t, kMaxWorkspaceBuffers> offset{};
    std::array<size_t, kMaxWorkspaceBuffers> bytes{};
    size_t total{0};
};

//! The workspace for `dims` (T = tokens): every manifest workspace buffer, sized with the worst
//! BLOCK_M of the tile table, each at a 256-byte aligned offset. Monotone in T, so the layout for
//! any T <= T_max fits in the size computed for T_max. Allocation-free.
bool computeWorkspace(KernelSet const& set, LayerDims const& dims, int32_t topK, int32_t km, DType act,
    WorkspaceLayout& out, std::string* error);

struct LaunchArg
{
    ArgKind kind{ArgKind::kI32};
    int32_t buffer{-1};  //!< pointers: BufferId, or kNumIoBuffers + workspace index; -1 = null
    int64_t value{0};    //!< integers: the value; pointers: byte offset into the buffer
    bool aligned16{false}; //!< pointer the kernel assumes 16-byte aligned
};

struct KernelLaunch
{
    int32_t kernel{-1}; //!< index into KernelSet::kernels
    std::array<uint32_t, 3> grid{};
    uint32_t block{0};
    uint32_t shared{0};
    int32_t numArgs{0}; //!< including the trailing null pointers
    std::array<LaunchArg, kMaxKernelArgs> args{};
};

struct PlanRequest
{
    Variant variant{Variant::kCompressed};
    MoeAttrs attrs;
    DType activation{DType::kOther};
    DType logits{DType::kOther};
    LayerDims dims;
    int32_t arch{0};
    int64_t maxSharedBytes{0}; //!< the device's opt-in limit per block; 0 = do not check
};

struct LaunchPlan
{
    int32_t set{-1};
    int32_t arch{0};
    int32_t plan{-1};  //!< index into KernelSet::plans
    int64_t tokens{0}; //!< T the plan was built for
    WorkspaceLayout workspace;
    int32_t numLaunches{0};
    std::array<KernelLaunch, kMaxLaunches> launches{};
};

//! The ordered kernel launches for one layer call: grids, blocks, shared memory and argument
//! values from the manifest's formulas. T == 0 gives an empty plan. Checks the kernels'
//! assumptions (divisible_by_16 integers), 32-bit argument ranges and grid limits. Does not
//! allocate on success (enqueue may call it).
bool buildLaunchPlan(KernelLibrary const& library, PlanRequest const& request, LaunchPlan& out, std::string* error);

//! configurePlugin's check of a build profile: plans build for tokens tMin..tMax on every arch in
//! `archs` (at tMin, tMax and both sides of every tile-table boundary in between), so a shape the
//! profile allows cannot fail in enqueue for a reason known at build time.
bool checkTokenRange(KernelLibrary const& library, PlanRequest const& request, int64_t tMin, int64_t tMax,
    std::vector<int32_t> const& archs, std::string* error);

//! Workspace bytes for T_max (getWorkspaceSize), 0 with a message when no kernel set fits.
size_t workspaceBytes(KernelLibrary const& library, PlanRequest const& request, std::string* error);

//! Byte address of argument `arg` given the buffer base addresses (index BufferId / workspace).
//! Returns false when a pointer the kernel assumes 16-byte aligned is not.
bool resolvePointer(LaunchArg const& arg, uint64_t const* bufferBase, uint64_t& address) noexcept;

} // namespace ce_trt
