// Replaces global operator new / delete with counting versions, in their own translation unit (GCC's
// -Wmismatched-new-delete would otherwise see malloc/free through inlining). logic_tests.cpp uses
// the count to check that launch planning never allocates.
#include <atomic>
#include <cstdlib>
#include <new>

namespace
{
std::atomic<long> gAllocations{0};
}

long allocationCount()
{
    return gAllocations.load();
}

void* operator new(std::size_t size)
{
    ++gAllocations;
    if (void* p = std::malloc(size ? size : 1))
    {
        return p;
    }
    throw std::bad_alloc();
}

void operator delete(void* p) noexcept
{
    std::free(p);
}

void operator delete(void* p, std::size_t) noexcept
{
    std::free(p);
}

// The other replaceable forms, so that every allocation pairs with a matching deallocation (also
// under sanitizers, which otherwise supply their own versions of these).
void* operator new[](std::size_t size)
{
    return ::operator new(size);
}

void* operator new(std::size_t size, std::nothrow_t const&) noexcept
{
    ++gAllocations;
    return std::malloc(size ? size : 1);
}

void* operator new[](std::size_t size, std::nothrow_t const&) noexcept
{
    return ::operator new(size, std::nothrow);
}

void operator delete[](void* p) noexcept
{
    std::free(p);
}

void operator delete[](void* p, std::size_t) noexcept
{
    std::free(p);
}

void operator delete(void* p, std::nothrow_t const&) noexcept
{
    std::free(p);
}

void operator delete[](void* p, std::nothrow_t const&) noexcept
{
    std::free(p);
}
